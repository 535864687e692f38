"""A registered version made servable where it is made: its ONNX twin (checked against
Keras), logged in the version's run, and the aggregator's signature over it.

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
                            signing_key, run, round)


def publish_file(client: Any, model_name: str, version: str, run_id: str, path: Path,
                 weights_sha256: str, parity_max_abs_diff: float,
                 signing_key: Any | None = None, run: str = "", round: int = 0) -> Published:
    """Log the ONNX file at ``path`` to ``run_id`` and tag ``version`` with its URI, SHA-256
    and, with ``signing_key`` (the aggregator's), the signature the inference service checks."""
    from leukofed import signing

    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    folder = artifact_path(model_name, version)
    client.log_artifact(run_id, str(path), artifact_path=folder)
    uri = f"runs:/{run_id}/{folder}/{Path(path).name}"
    signature = (signing.sign_model(signing_key, model_name, version, digest, weights_sha256,
                                    run, round)
                 if signing_key is not None else TAG_UNSIGNED)
    # The signature last: a reader seeing it knows the file and digest it names are there.
    for key, value in ((TAG_URI, uri), (TAG_SHA, digest),
                       (TAG_DIFF, f"{parity_max_abs_diff:.3g}"),
                       (TAG_WEIGHTS_SHA, weights_sha256), (TAG_SIGNATURE, signature)):
        client.set_model_version_tag(model_name, version, key, value)
    log.info("version %s published as ONNX (%d bytes, parity diff %.2g, %s)", version,
             len(data), parity_max_abs_diff, "signed" if signing_key is not None else "unsigned")
    return Published(digest, weights_sha256, parity_max_abs_diff, signing_key is not None, uri)
