"""Helpers shared by the inference tests and the benchmark: a tiny registered model and
the service under real uvicorn in a subprocess. Not imported by the service itself."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SMEAR_PROFILE = "smear"  # tiny_onnx's default: the profile of smear_like images
PROFILE_IMAGES = 96  # smear_like images behind a test profile
PROFILE_SEED = 1000  # their seeds: PROFILE_SEED, PROFILE_SEED + 1, ...; test images use < 1000


def smear_like(size: int, seed: int) -> np.ndarray:
    """A synthetic blood-smear field, uint8 (size, size, 3): a light pink background with
    pale red cells and one or two purple-stained white cells (the ones leukofed.stain's
    cell mask finds). Every seed is another field of the same "laboratory"."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = np.empty((size, size, 3), np.float32)
    image[:] = np.array([228.0, 212.0, 222.0]) + rng.normal(0, 3, 3)
    for _ in range(int(rng.integers(8, 14))):  # red cells: pale discs
        cy, cx = rng.uniform(0, size, 2)
        r = size * rng.uniform(0.06, 0.08)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image[disc] = np.array([224.0, 186.0, 188.0]) + rng.normal(0, 3, 3)
    for _ in range(int(rng.integers(1, 3))):  # white cells: purple blobs
        cy, cx = rng.uniform(0.2 * size, 0.8 * size, 2)
        ry, rx = size * rng.uniform(0.10, 0.14, 2)
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        image[blob] = np.array([118.0, 62.0, 158.0]) + rng.normal(0, 6, 3)
    image += rng.normal(0, 3, image.shape)
    image = gaussian_filter(image, sigma=(0.6, 0.6, 0))
    return image.clip(0, 255).astype(np.uint8)


def smear_like_images(size: int, count: int, seed: int = 0) -> np.ndarray:
    return np.stack([smear_like(size, seed + i) for i in range(count)])


@functools.lru_cache(maxsize=8)
def _smear_profile_json(size: int, count: int, seed: int) -> str:
    from leukofed.ood import AcquisitionProfile, ProfileStats

    stats = ProfileStats.of_images(smear_like_images(size, count, seed))
    return json.dumps(AcquisitionProfile.from_stats(stats).to_dict())


def smear_profile(size: int, count: int = PROFILE_IMAGES, seed: int = PROFILE_SEED) -> dict:
    """``AcquisitionProfile.to_dict()`` of ``count`` smear_like images at ``size`` px: what
    a model version trained on such images carries as its "acquisition_profile"."""
    return json.loads(_smear_profile_json(size, count, seed))


def tiny_onnx(image_size: int = 32, seed: int = 0, classes: tuple[str, ...] | None = None,
              version_note: str = "", profile: Any = SMEAR_PROFILE,
              weights: np.ndarray | None = None,
              metadata: dict[str, Any] | None = None) -> bytes:
    """A small ONNX classifier built without TensorFlow (mean colour -> softmax), with
    leukofed metadata; for unit tests that need a real onnxruntime session.

    ``profile``: the metadata's "acquisition_profile": by default smear_profile(image_size);
    None leaves the key out (a version from before profiles); anything else goes in as
    given (malformed ones too). ``weights`` (3, classes): logits = mean RGB (0-255) @
    weights, instead of random ones from ``seed`` (COLOUR_WEIGHTS: a solid colour picks the
    probabilities). ``metadata``: more keys (e.g. "calibration", "card"), as given."""
    from onnx import TensorProto, helper, numpy_helper

    from leukofed.labels import CLASSES
    from leukofed.preprocessing import PREPROCESSING

    classes = classes or CLASSES
    if weights is None:
        weights = np.random.default_rng(seed).normal(0, 0.05, (3, len(classes)))
    weights = np.asarray(weights, np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes"], ["mean"], keepdims=0),
        helper.make_node("MatMul", ["mean", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                       ["batch", image_size, image_size, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT,
                                       ["batch", len(classes)])],
        initializer=[numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
                     numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    meta = {"classes": list(classes), "image_size": image_size, "preprocessing": PREPROCESSING,
            "architecture": f"tiny{version_note}"}
    if profile is not None:
        meta["acquisition_profile"] = (smear_profile(image_size) if profile == SMEAR_PROFILE
                                       else profile)
    meta.update(metadata or {})
    from leukofed.export import onnx_metadata

    for key, value in onnx_metadata(meta).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


# tiny_onnx weights for which a solid colour decides the probabilities (logits = RGB @ W):
# red -> Benign, green -> Pro, blue -> Pre and Pro tied, yellow -> Benign and Pro tied,
# magenta -> Benign, Pre and Pro tied (each about 1/3).
COLOUR_WEIGHTS = np.array([[0.05, 0.0, 0.0, 0.0],    # red
                           [0.0, 0.0, 0.0, 0.05],    # green
                           [0.0, 0.0, 0.05, 0.05]],  # blue
                          np.float32)
# Benign and Pro tied on any image with some red (smear-like fields: about 0.5 each).
BENIGN_PRO_WEIGHTS = np.array([[0.05, 0.0, 0.0, 0.05],
                               [0.0, 0.0, 0.0, 0.0],
                               [0.0, 0.0, 0.0, 0.0]], np.float32)


def calibration_entry(temperature: float = 2.0, coverage: float = 0.95,
                     quantile: float = 0.6) -> dict:
    """A "calibration" metadata entry: with quantile 0.6 a class is in the set when its
    calibrated probability is >= 0.4, so a confident image gets one class, two tied
    classes (0.5 each) both, three tied ones (1/3 each) none."""
    from leukofed.calibration import Calibration

    return Calibration(temperature, coverage, (quantile,) * 4).to_dict()


def card_entry(name: str = "leukofed-unit", version: str = "1") -> dict:
    """A model card ("card" metadata entry) with nothing measured but the identity."""
    from leukofed.card import build_card

    return build_card({"model_name": name, "version": version, "model": "tiny",
                       "image_size": 32})


def register_onnx_version(tracking_uri: str, model_name: str, onnx: bytes,
                          champion: bool = True, signing_key: Any | None = None) -> str:
    """Register a version in MLflow whose ONNX file (e.g. ``tiny_onnx(...)``) is published
    as the aggregator publishes one (``registry.publish.publish_file``; signed with
    ``signing_key`` when given), so serving it needs no TensorFlow. Returns the version."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from registry.publish import publish_file

    # An explicit client only: MLflow's process-wide URIs would leak into later tests.
    client = MlflowClient(tracking_uri, tracking_uri)
    experiment = f"inference-tests-{model_name}"
    found = client.get_experiment_by_name(experiment)
    exp_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(exp_id)
    client.log_text(run.info.run_id, "ONNX only", "model/README.txt")
    client.set_terminated(run.info.run_id)
    with contextlib.suppress(MlflowException):  # it exists already
        client.create_registered_model(model_name)
    mv = client.create_model_version(model_name, f"runs:/{run.info.run_id}/model",
                                     run_id=run.info.run_id)
    version = str(mv.version)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(onnx)
        publish_file(client, model_name, version, run.info.run_id, path, "", 0.0,
                     signing_key)
    if champion:
        if signing_key is not None:  # signed mode serves an alias only with its approval
            approve(client, model_name, version, signing_key)
        client.set_registered_model_alias(model_name, "champion", version)
    return version


_SEQ = itertools.count(int(time.time() * 1000))


def approve(client: Any, model_name: str, version: str, signing_key: Any,
            alias: str = "champion", **kwargs: Any) -> str:
    """Tag ``version`` with the aggregator's approval for ``alias`` (leukofed.approval), as
    its promotion does, with a sequence number newer than any before; returns the text."""
    from leukofed.approval import approval_tag, make_approval
    from registry.publish import TAG_SHA

    sha = client.get_model_version(model_name, version).tags[TAG_SHA]
    _, text = make_approval(signing_key, model=model_name, version=version, alias=alias,
                            onnx_sha256=sha, approved_by="tests", seq=next(_SEQ), **kwargs)
    client.set_model_version_tag(model_name, version, approval_tag(alias), text)
    return text


def register_tiny_model(tracking_uri: str, model_name: str, seed: int, image_size: int = 32,
                        champion: bool = False, profile: bool = False,
                        rotation_ensemble: bool = True, signing_key: Any | None = None,
                        architecture: str = "compact_cnn", alpha: float = 0.35) -> str:
    """Build a model (a compact_cnn unless ``architecture`` says otherwise), log and register
    it in MLflow, and publish its ONNX file as the aggregator does (signed with
    ``signing_key`` when given): the inference service serves only published ONNX files.
    Returns the version. ``profile``: its metadata carries smear_profile(image_size) as
    acquisition profile."""
    import mlflow
    from mlflow import MlflowClient

    from leukofed.export import parity_batch
    from leukofed.models import build_model, model_metadata
    from registry.model_versions import log_and_register, set_alias
    from registry.publish import publish_onnx

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    model = build_model(architecture, image_size=image_size, alpha=alpha, seed=seed,
                        dropout=0.0, rotation_ensemble=rotation_ensemble)
    meta = model_metadata(model, architecture, image_size)
    if profile:
        meta["acquisition_profile"] = smear_profile(image_size)
    mlflow.set_experiment(f"inference-tests-{model_name}")
    with mlflow.start_run() as run:
        version = log_and_register(model, meta, model_name=model_name, tags={"seed": seed})
    publish_onnx(MlflowClient(tracking_uri, tracking_uri), model_name, version,
                 run.info.run_id, model, meta, parity_batch(image_size, count=4), signing_key)
    if champion:
        set_alias(version, "champion", model_name)
    return version


@dataclass
class ServiceProcess:
    """``python -m services.inference`` on a port, configured by LEUKOFED_INFERENCE_* env."""

    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        env = {**os.environ, **self.env, "LEUKOFED_INFERENCE_PORT": str(self.port),
               "LEUKOFED_INFERENCE_HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.inference"], cwd=ROOT,
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.wait_live(timeout)
        return self

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def wait_live(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.get("/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"service not live after {timeout}s:\n{self.log()}")

    def wait_ready(self, timeout: float = 120.0, version: str | None = None) -> dict:
        deadline = time.monotonic() + timeout
        body: Any = None
        while time.monotonic() < deadline:
            status, body = self.get("/readyz")
            if status == 200 and (version is None or body["model"]["version"] == version):
                return body
            time.sleep(0.25)
        raise TimeoutError(f"not ready (version {version}) after {timeout}s: {body}\n"
                           f"{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "_log"):
            self._log.close()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and has no pixel data: a bomb's header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def encode(img: Any, fmt: str, **kwargs: Any) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise_image(size: int = 64, seed: int = 0, mode: str = "RGB") -> Any:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode)


# Limits the bad-input tables assume the service runs with (small, so tests stay light).
BAD_INPUT_MAX_UPLOAD_BYTES = 1_000_000
BAD_INPUT_MAX_PIXELS = 4_000_000


def bad_inputs() -> list[tuple[str, str, bytes, int, str]]:
    """(case, filename, bytes, expected status, text the message must contain)."""
    from PIL import Image

    jpeg = encode(noise_image(96), "JPEG", quality=90)
    png = encode(noise_image(32), "PNG")
    corrupt_png = png[:60] + bytes(len(png) - 60)
    return [
        ("empty", "empty.png", b"", 422, "empty.png: empty file"),
        ("truncated jpeg", "half.jpg", jpeg[: len(jpeg) // 2], 422, "half.jpg: cannot decode"),
        ("corrupt png", "zeros.png", corrupt_png, 422, "zeros.png: cannot decode"),
        ("text file", "notes.txt", b"patient notes, not an image\n" * 10, 415,
         "notes.txt: not a recognised image"),
        ("pdf", "report.pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", 415,
         "report.pdf: not a recognised image"),
        ("pixel bomb (over max_pixels)", "big.png",
         encode(Image.new("1", (2500, 2500)), "PNG"), 413, "big.png: image too large"),
        ("decompression bomb header", "bomb.png", _png_header_only(100_000, 100_000), 413,
         "bomb.png: image too large"),
        ("oversize upload", "huge.bmp", b"BM" + bytes(BAD_INPUT_MAX_UPLOAD_BYTES + 10), 413,
         "upload limit"),
    ]


def good_inputs() -> list[tuple[str, str, bytes]]:
    """Every supported format and mode: (case, filename, bytes); all must classify."""
    from PIL import Image

    rgb = noise_image(40)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    i16 = Image.fromarray(np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40)
    return [
        ("jpeg rgb", "a.jpg", encode(rgb, "JPEG")),
        ("jpeg cmyk", "cmyk.jpg", encode(rgb.convert("CMYK"), "JPEG")),
        ("jpeg exif orientation", "rotated.jpg",
         encode(noise_image(40).resize((40, 30)), "JPEG", exif=exif.tobytes())),
        ("png L", "gray.png", encode(rgb.convert("L"), "PNG")),
        ("png LA", "gray-alpha.png", encode(rgb.convert("LA"), "PNG")),
        ("png P", "palette.png", encode(rgb.convert("P"), "PNG")),
        ("png RGBA", "rgba.png", encode(rgb.convert("RGBA"), "PNG")),
        ("png I;16", "deep.png", encode(i16, "PNG")),
        ("bmp", "a.bmp", encode(rgb, "BMP")),
        ("tiff", "a.tiff", encode(rgb, "TIFF")),
    ]


def serve_fake_registry(tmp_path: Path, model_name: str, resolve: Any, fetch: Any) -> Any:
    """A TestClient of the service reading versions from a fake registry (unit tests):
    ``resolve`` and ``fetch`` replace the MLflow lookup and the ONNX download."""
    from fastapi.testclient import TestClient

    from services.inference.app import create_app
    from services.inference.model_source import ModelSource
    from services.inference.settings import InferenceSettings

    s = InferenceSettings(tracking_uri="http://unused", model_name=model_name,
                          poll_interval_s=0.05, onnx_cache_dir=tmp_path, threads=1)
    return TestClient(create_app(s, ModelSource(s, resolver=resolve, fetch_onnx=fetch)))


def wait_ready(client: Any, timeout: float = 10) -> None:
    """Until /readyz answers 200 (the first version is loaded), or fail with its reason."""
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.02)
