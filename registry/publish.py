"""A registered version made servable where it is made: its ONNX twin (checked against
Keras), logged in the version's run as an MLflow model of the ``onnx`` flavor (with a
signature and an input example, so ``mlflow models serve`` and any MLflow-aware tool can use
it), and the aggregator's signature over the exact bytes of its model file.

The inference service reads only what this writes (the ONNX file and these tags) and never
loads a Keras or SavedModel artifact: TensorFlow stays on the training side, and a version
is served only when its ONNX bytes match the aggregator's Ed25519 signature
(``leukofed.signing.verify_model``). Anyone who can write to MLflow can still move an alias
or a tag, but not make the service run a file the aggregator did not sign.

Publishing is idempotent: a version whose tags already name a signed file is left alone, so
an aggregator that crashed between registering and publishing finishes the job on resume.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ARTIFACT_DIR = "leukofed-onnx"
TAG_URI = "leukofed.onnx.artifact_uri"
TAG_SHA = "leukofed.onnx.sha256"
TAG_DIFF = "leukofed.onnx.parity_max_abs_diff"
TAG_PARITY_FAILED = "leukofed.onnx.parity_failed"
TAG_SIGNATURE = "leukofed.signature"  # leukofed.signing.sign_model's text
TAG_WEIGHTS_SHA = "leukofed.weights.sha256"  # leukofed.wire.weights_digest of the Keras model
TAG_UNSIGNED = "unsigned (the aggregator has no signing key: development mode)"


@dataclass(frozen=True)
class Published:
    onnx_sha256: str
    weights_sha256: str
    parity_max_abs_diff: float
    signed: bool
    artifact_uri: str


def safe_name(name: str) -> str:
    """A name usable as one path component: anything but letters, digits, '_.-' is '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def artifact_path(model_name: str, version: str) -> str:
    return f"{ARTIFACT_DIR}/{safe_name(model_name)}/v{version}"


def publish_onnx(client: Any, model_name: str, version: str, run_id: str, model: Any,
                 metadata: dict[str, Any], parity_images: np.ndarray,
                 signing_key: Any | None = None, run: str = "", round: int = 0
                 ) -> Published | None:
    """Export ``model`` (the Keras model of ``version``) to ONNX, refusing it when the two
    runtimes disagree (the version is then tagged ``parity_failed`` and None is returned),
    and publish the file (``publish_file``). None too when it was published already."""
    from leukofed.export import ParityError, export_onnx
    from leukofed.wire import weights_digest, weights_from_model

    tags = dict(client.get_model_version(model_name, version).tags or {})
    if tags.get(TAG_SHA) and (tags.get(TAG_SIGNATURE) or signing_key is None):
        return None  # published already (a resumed run registering the same round)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            report = export_onnx(model, metadata, path, parity_images)
        except ParityError as exc:
            log.error("version %s not servable: %s", version, exc)
            client.set_model_version_tag(model_name, version, TAG_PARITY_FAILED, str(exc))
            return None
        return publish_file(client, model_name, version, run_id, path,
                            weights_digest(weights_from_model(model)), report.max_abs_diff,
                            signing_key, run, round, input_example=parity_images[:1])


def pinned_requirements(*packages: str) -> list[str]:
    """``package==version`` for each of ``packages`` installed here (an MLflow model's
    requirements, written out so that MLflow does not infer them in a subprocess)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in packages:
        try:
            out.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return out


def onnx_requirements() -> list[str]:
    """What the ONNX flavor needs to run, pinned to the versions installed here."""
    return pinned_requirements("onnx", "onnxruntime", "numpy")


def save_mlflow_onnx(path: Path, out_dir: Path, input_example: np.ndarray | None = None
                     ) -> Path:
    """Save the ONNX file at ``path`` as an MLflow model (``onnx`` flavor) in ``out_dir``,
    with a signature from running it on one image of ``input_example`` (N x S x S x 3;
    default one black image of the model's input size). Returns the model file inside
    ``out_dir``: byte for byte the file at ``path``."""
    import mlflow.onnx
    import onnx
    from mlflow.models import Model, infer_signature

    from leukofed.export import cpu_session

    data = Path(path).read_bytes()
    session = cpu_session(data)
    first = session.get_inputs()[0]
    if input_example is None:
        input_example = np.zeros([1] + [d if isinstance(d, int) else 1
                                        for d in first.shape[1:]], np.float32)
    example = np.asarray(input_example[:1], np.float32)
    output = session.run(None, {first.name: example})[0]
    # One file: the inference service downloads the model file alone, by URI.
    # Explicit requirements: MLflow's inference of them imports the model's flavor in a
    # subprocess, 2.2 s of the 2.9 s this save took per version on 2 cores.
    mlflow.onnx.save_model(onnx.load_from_string(data), str(out_dir),
                           signature=infer_signature(example, output),
                           input_example=example, save_as_external_data=False,
                           onnx_execution_providers=["CPUExecutionProvider"],
                           pip_requirements=onnx_requirements())
    model_file = Path(out_dir) / Model.load(str(out_dir)).flavors["onnx"]["data"]
    # The parity-checked bytes, not onnx's re-serialisation of them: the signature and the
    # inference service's digest check name exactly these.
    model_file.write_bytes(data)
    return model_file


def publish_file(client: Any, model_name: str, version: str, run_id: str, path: Path,
                 weights_sha256: str, parity_max_abs_diff: float,
                 signing_key: Any | None = None, run: str = "", round: int = 0,
                 input_example: np.ndarray | None = None) -> Published:
    """Log the ONNX file at ``path`` to ``run_id`` as an MLflow model of the onnx flavor
    (``save_mlflow_onnx``) and tag ``version`` with its model file's URI, SHA-256 and, with
    ``signing_key`` (the aggregator's), the signature the inference service checks."""
    from leukofed import signing

    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    folder = artifact_path(model_name, version)
    with tempfile.TemporaryDirectory() as tmp:
        model_file = save_mlflow_onnx(Path(path), Path(tmp) / "model", input_example)
        client.log_artifacts(run_id, str(model_file.parent), artifact_path=folder)
    uri = f"runs:/{run_id}/{folder}/{model_file.name}"
    signature = (signing.sign_model(signing_key, model_name, version, digest, weights_sha256,
                                    run, round, artifact_uri=uri)
                 if signing_key is not None else TAG_UNSIGNED)
    # The signature last: a reader seeing it knows the file and digest it names are there.
    for key, value in ((TAG_URI, uri), (TAG_SHA, digest),
                       (TAG_DIFF, f"{parity_max_abs_diff:.3g}"),
                       (TAG_WEIGHTS_SHA, weights_sha256), (TAG_SIGNATURE, signature)):
        client.set_model_version_tag(model_name, version, key, value)
    log.info("version %s published as ONNX (%d bytes, parity diff %.2g, %s)", version,
             len(data), parity_max_abs_diff, "signed" if signing_key is not None else "unsigned")
    return Published(digest, weights_sha256, parity_max_abs_diff, signing_key is not None, uri)
