"""The ONNX file of a registered version, checked before it is served.

The aggregator exports each version it registers to ONNX, checks it against Keras, logs it
in the version's run and signs its SHA-256 (``registry.publish``). This side only reads:
1. the version's tags name the file (``leukofed.onnx.*``) and carry the signature;
2. with the aggregator's public key, the signature must hold over this model name, this
   version number and that digest (``leukofed.signing.verify_model``), or the version is
   refused for good: retagging a version to another file, or copying another version's
   signature, is caught here;
3. the file's address is the one in the signed claims (older signatures without one: the
   layout ``registry.publish`` writes, under the version's own MLflow run), never the
   editable ``leukofed.onnx.artifact_uri`` tag, and its scheme must be one the deployment
   allows (``runs``, ``models``, ``mlflow-artifacts`` by default): ``file://``, ``http://``
   and the rest are refused before anything is fetched (issue 26, finding 6);
4. the bytes come from the local cache ``<cache>/<name>/v<version>-<run_id>/model.onnx``
   when its checksum is the signed one, else from MLflow, and must hash to the signed digest.
It never loads a Keras or SavedModel artifact (their loaders can run code) and imports no
TensorFlow. A version without an ONNX file is not served (and not refused: its publication
may still be on its way).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from leukofed import signing
from registry.client import Registry, VersionInfo
from registry.publish import (
    TAG_DIFF,
    TAG_PARITY_FAILED,
    TAG_SHA,
    TAG_SIGNATURE,
    TAG_UNSIGNED,
    TAG_URI,
    artifact_path,
    safe_name,
)

log = logging.getLogger(__name__)
__all__ = ["ExportError", "NotPublished", "OnnxArtifact", "OnnxStore", "UntrustedModel",
           "VersionInfo", "sha256"]

UNCHECKED = "unchecked: no aggregator public key configured (development mode)"
DEFAULT_SCHEMES = ("runs", "models", "mlflow-artifacts")
ONNX_FILE = "model.onnx"  # mlflow.onnx's model file, as registry.publish logs it


def check_artifact_uri(uri: str, schemes: Iterable[str] = DEFAULT_SCHEMES) -> str:
    """``uri`` when its scheme is allowed and it climbs no folder; UntrustedModel otherwise
    (a ``file:///etc/hostname`` must never reach ``download_artifacts``)."""
    allowed = tuple(schemes)
    scheme = urlsplit(uri).scheme.lower()
    if scheme not in allowed:
        raise UntrustedModel(f"artifact address {uri[:120]!r} refused: scheme "
                             f"{scheme or 'none'!r} is not one of {', '.join(allowed)}")
    if ".." in uri.replace("\\", "/").split("/"):
        raise UntrustedModel(f"artifact address {uri[:120]!r} refused: it climbs a folder")
    return uri


def derived_uri(info: VersionInfo) -> str:
    """Where ``registry.publish`` logs a version's ONNX file: under the version's own MLflow
    run (MLflow's record, not a tag), in its fixed folder."""
    return f"runs:/{info.run_id}/{artifact_path(info.name, info.version)}/{ONNX_FILE}"


class ExportError(RuntimeError):
    """The version has no servable ONNX model, and never will (not transient)."""


class UntrustedModel(ExportError):
    """The version's ONNX file is not the one the aggregator signed (not transient)."""


class NotPublished(RuntimeError):
    """The version has no ONNX file (yet): not served, asked again at the next poll."""


@dataclass(frozen=True)
class OnnxArtifact:
    data: bytes
    sha256: str
    origin: str  # "local-cache" | "mlflow-artifact"
    parity_max_abs_diff: float | None
    signature: str = UNCHECKED  # what was checked: "verified: ..." or UNCHECKED


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class OnnxStore:
    def __init__(self, cache_dir: Path, registry: Registry,
                 public_key: Any | None = None,
                 schemes: Iterable[str] = DEFAULT_SCHEMES,
                 approve: Callable[[VersionInfo, str], None] | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.registry = registry  # read-only: a version's tags and its ONNX file
        self.public_key = public_key  # the aggregator's Ed25519 key; None: development mode
        self.schemes = tuple(schemes)
        # Called with the version and its signed digest once the model signature holds and
        # before anything is fetched; raises leukofed.approval.NotApproved (not refused for
        # good: the approval may come at the next poll).
        self.approve = approve

    def local_path(self, info: VersionInfo) -> Path:
        return (self.cache_dir / safe_name(info.name)
                / f"v{info.version}-{safe_name(info.run_id or 'norun')}" / "model.onnx")

    def get(self, info: VersionInfo) -> OnnxArtifact:
        if failed := info.tags.get(TAG_PARITY_FAILED):
            raise ExportError(f"version {info.version} failed its parity check: {failed}")
        expected = info.tags.get(TAG_SHA)
        if not expected or not info.tags.get(TAG_URI):
            raise NotPublished(
                f"version {info.version} has no ONNX file: the aggregator exports and signs "
                "each version it registers; a version registered otherwise is never served")
        signature, uri = self._check_signature(info, expected)
        if self.approve is not None:
            self.approve(info, expected)
        path = self.local_path(info)
        artifact = (self._read_local(path, expected)
                    or self._download(info, path, expected, uri))
        return OnnxArtifact(artifact.data, artifact.sha256, artifact.origin,
                            artifact.parity_max_abs_diff, signature)

    def _check_signature(self, info: VersionInfo, onnx_sha256: str) -> tuple[str, str]:
        """What was checked, and the address to download from (scheme allowed)."""
        if self.public_key is None:  # development mode: the tag, its scheme still checked
            return UNCHECKED, check_artifact_uri(info.tags[TAG_URI], self.schemes)
        signature = info.tags.get(TAG_SIGNATURE)
        try:
            claims = signing.verify_model(self.public_key,
                                          None if signature == TAG_UNSIGNED else signature,
                                          info.name, info.version, onnx_sha256)
        except signing.SignatureRejected as exc:
            raise UntrustedModel(
                f"version {info.version}'s ONNX file is not signed by the aggregator "
                f"({exc.reason}: {exc.message}); it is never served") from exc
        signed_uri = claims.get("artifact_uri")
        uri = signed_uri if isinstance(signed_uri, str) and signed_uri else derived_uri(info)
        return (f"verified: signed by the aggregator for run {claims['run'] or '?'} round "
                f"{claims['round']} (Keras weights sha256 {claims['weights_sha256'][:16]}...)",
                check_artifact_uri(uri, self.schemes))

    def _read_local(self, path: Path, expected: str) -> OnnxArtifact | None:
        sidecar = path.with_suffix(".json")
        if not (path.is_file() and sidecar.is_file()):
            return None
        meta = json.loads(sidecar.read_text())
        data = path.read_bytes()
        if sha256(data) != expected:
            log.warning("cached ONNX %s is not the file the version names; ignoring it", path)
            return None
        return OnnxArtifact(data, expected, "local-cache", meta.get("parity_max_abs_diff"))

    def _write_local(self, path: Path, data: bytes, diff: float | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        path.with_suffix(".json").write_text(
            json.dumps({"sha256": sha256(data), "parity_max_abs_diff": diff}))

    def _download(self, info: VersionInfo, path: Path, expected: str, uri: str
                  ) -> OnnxArtifact:
        with tempfile.TemporaryDirectory() as tmp:  # an unreachable store: retried next poll
            data = self.registry.download(uri, Path(tmp)).read_bytes()
        if sha256(data) != expected:
            raise UntrustedModel(f"version {info.version}'s ONNX file {uri} does not match its "
                                 f"recorded digest {expected[:16]}...; it is never served")
        try:
            diff = float(info.tags[TAG_DIFF]) if TAG_DIFF in info.tags else None
        except ValueError:
            diff = None
        self._write_local(path, data, diff)
        return OnnxArtifact(data, expected, "mlflow-artifact", diff)
