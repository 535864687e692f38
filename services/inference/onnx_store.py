"""ONNX for a registered model version: export once, keep it locally and in MLflow.

Lookup order, cheapest first:
1. the local cache ``<cache>/<name>/v<version>-<run_id>/model.onnx`` (checked against its
   SHA-256 sidecar; the run id is in the key because a fresh MLflow reuses version numbers);
2. the artifact that an earlier export logged to the version's MLflow run (found through
   the version's ``leukofed.onnx.*`` tags, checked against the recorded SHA-256), so a
   restart or a second replica never converts again;
3. a fresh tf2onnx export through ``leukofed.export.export_onnx``, which refuses a model
   whose ONNX twin disagrees with Keras (ParityError); the result is cached and logged.
TensorFlow is imported only in step 3, so serving a known version never loads it.
"""

from __future__ import annotations

import hashlib
import json
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


class ExportError(RuntimeError):
    """The version cannot be turned into a servable ONNX model (not transient)."""


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]


@dataclass(frozen=True)
class OnnxArtifact:
    data: bytes
    sha256: str
    origin: str  # "local-cache" | "mlflow-artifact" | "exported"
    parity_max_abs_diff: float | None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parity_images(size: int, directory: Path | None = None, count: int = 8) -> np.ndarray:
    """Images for the parity check: real ones from ``directory`` when given, else a fixed
    set of noise, flat and gradient images (what matters is numerical agreement)."""
    if directory is not None:
        from leukofed.preprocessing import load_image

        files = sorted(p for p in Path(directory).rglob("*") if p.is_file())[:count]
        images = []
        for path in files:
            try:
                images.append(load_image(path, size))
            except ValueError:
                continue
        if images:
            return np.stack(images)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (count - 2, size, size, 3), dtype=np.uint8)
    flat = np.full((1, size, size, 3), 128, np.uint8)
    ramp = np.broadcast_to(np.linspace(0, 255, size, dtype=np.uint8)[None, :, None],
                           (size, size, 3))[None]
    return np.concatenate([noise, flat, ramp])


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class OnnxStore:
    def __init__(self, cache_dir: Path, client: Any, tracking_uri: str,
                 log_to_mlflow: bool = True, parity_dir: Path | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.client = client
        self.tracking_uri = tracking_uri
        self.log_to_mlflow = log_to_mlflow
        self.parity_dir = parity_dir

    def local_path(self, info: VersionInfo) -> Path:
        return (self.cache_dir / _safe(info.name)
                / f"v{info.version}-{_safe(info.run_id or 'norun')}" / "model.onnx")

    def get(self, info: VersionInfo) -> OnnxArtifact:
        if failed := info.tags.get(TAG_PARITY_FAILED):
            raise ExportError(f"version {info.version} failed its parity check: {failed}")
        path = self.local_path(info)
        cached = self._read_local(path)
        if cached is not None:
            return cached
        downloaded = self._download(info, path)
        if downloaded is not None:
            return downloaded
        return self._export(info, path)

    def _read_local(self, path: Path) -> OnnxArtifact | None:
        sidecar = path.with_suffix(".json")
        if not (path.is_file() and sidecar.is_file()):
            return None
        meta = json.loads(sidecar.read_text())
        data = path.read_bytes()
        if sha256(data) != meta.get("sha256"):
            log.warning("cached ONNX %s does not match its checksum; ignoring it", path)
            return None
        return OnnxArtifact(data, meta["sha256"], "local-cache", meta.get("parity_max_abs_diff"))

    def _write_local(self, path: Path, data: bytes, diff: float | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        path.with_suffix(".json").write_text(
            json.dumps({"sha256": sha256(data), "parity_max_abs_diff": diff}))

    def _download(self, info: VersionInfo, path: Path) -> OnnxArtifact | None:
        uri, expected = info.tags.get(TAG_URI), info.tags.get(TAG_SHA)
        if not uri or not expected:
            return None
        import mlflow.artifacts

        try:
            with tempfile.TemporaryDirectory() as tmp:
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=uri, dst_path=tmp, tracking_uri=self.tracking_uri)
                data = Path(local).read_bytes()
        except Exception as exc:  # a missing artifact is not fatal: export again
            log.warning("cannot download %s (%s); exporting again", uri, exc)
            return None
        if sha256(data) != expected:
            log.warning("ONNX artifact %s does not match tag %s; exporting again", uri, TAG_SHA)
            return None
        diff = float(info.tags[TAG_DIFF]) if TAG_DIFF in info.tags else None
        self._write_local(path, data, diff)
        return OnnxArtifact(data, expected, "mlflow-artifact", diff)

    def _export(self, info: VersionInfo, path: Path) -> OnnxArtifact:
        import mlflow

        from leukofed.export import ParityError, export_onnx
        from registry.store import load_version

        # registry.store reads MLflow's global URI; only the export path needs it.
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        loaded = load_version(info.version, info.name)
        meta = loaded.metadata
        if not meta.get("classes") or not meta.get("image_size"):
            raise ExportError(f"version {info.version} has no leukofed metadata "
                              "(classes, image_size): it was not registered by leukofed")
        images = parity_images(int(meta["image_size"]), self.parity_dir)
        try:
            report = export_onnx(loaded.model, meta, path, images)
        except ParityError as exc:
            self._tag(info, {TAG_PARITY_FAILED: str(exc)})
            raise
        except Exception as exc:
            raise ExportError(f"tf2onnx export of version {info.version} failed: {exc}") from exc
        data = path.read_bytes()
        self._write_local(path, data, report.max_abs_diff)
        log.info("exported version %s to ONNX (%d bytes, parity diff %.2g)",
                 info.version, report.size_bytes, report.max_abs_diff)
        self._publish(info, path, report.sha256, report.max_abs_diff)
        return OnnxArtifact(data, report.sha256, "exported", report.max_abs_diff)

    def _publish(self, info: VersionInfo, path: Path, digest: str, diff: float) -> None:
        """Log the ONNX file to the version's run and point the version's tags at it."""
        if not (self.log_to_mlflow and info.run_id):
            return
        artifact_path = f"{ARTIFACT_DIR}/{_safe(info.name)}/v{info.version}"
        try:
            self.client.log_artifact(info.run_id, str(path), artifact_path=artifact_path)
            self._tag(info, {
                TAG_URI: f"runs:/{info.run_id}/{artifact_path}/{path.name}",
                TAG_SHA: digest,
                TAG_DIFF: f"{diff:.3g}",
            })
        except Exception as exc:  # serving must not depend on the write-back succeeding
            log.warning("could not log the ONNX file to MLflow run %s: %s", info.run_id, exc)

    def _tag(self, info: VersionInfo, tags: dict[str, str]) -> None:
        try:
            for key, value in tags.items():
                self.client.set_model_version_tag(info.name, info.version, key, value[:5000])
        except Exception as exc:
            log.warning("could not tag version %s: %s", info.version, exc)
