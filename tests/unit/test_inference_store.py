"""The ONNX store's local cache, its checksum guard, and the CLI's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from leukofed import signing
from registry.client import Registry, RegistryError
from registry.publish import TAG_PARITY_FAILED, TAG_SHA, TAG_SIGNATURE, TAG_URI
from services.inference.cli import format_table
from services.inference.onnx_files import (
    ExportError,
    NotPublished,
    OnnxStore,
    UntrustedModel,
    VersionInfo,
    sha256,
)


def published(name: str, version: str, data: bytes, key: object | None = None,
              signed_version: str | None = None) -> VersionInfo:
    """A version's tags as registry.publish writes them (signed for ``signed_version``)."""
    digest = sha256(data)
    tags = {TAG_URI: f"runs:/r{version}/leukofed-onnx/m/v{version}/model.onnx", TAG_SHA: digest}
    if key is not None:
        tags[TAG_SIGNATURE] = signing.sign_model(key, name, signed_version or version, digest,
                                                 "w" * 64, "run-1", 2)
    return VersionInfo(name, version, f"r{version}", tags)


def test_local_cache_is_keyed_by_run_and_checked_against_the_version(tmp_path: Path) -> None:
    store = OnnxStore(tmp_path, Registry("http://unused"))
    info = published("m", "3", b"onnx-bytes")
    path = store.local_path(info)
    assert path.parent.name == "v3-r3"  # a fresh MLflow reusing "3" gets another run id
    store._write_local(path, b"onnx-bytes", 1e-7)
    hit = store.get(info)
    assert hit.origin == "local-cache" and hit.data == b"onnx-bytes"
    assert hit.signature.startswith("unchecked")  # no public key: development mode
    path.write_bytes(b"tampered")
    assert store._read_local(path, info.tags[TAG_SHA]) is None  # never served


def test_version_without_onnx_is_not_served_and_asked_again(tmp_path: Path) -> None:
    store = OnnxStore(tmp_path, Registry("http://unused"))
    with pytest.raises(NotPublished, match="no ONNX file"):
        store.get(VersionInfo("m", "1", "r", {}))
    assert not issubclass(NotPublished, ExportError)  # not refused for good


def test_version_tagged_as_failing_parity_is_refused(tmp_path: Path) -> None:
    store = OnnxStore(tmp_path, Registry("http://unused"))
    info = VersionInfo("m", "4", "r", {TAG_PARITY_FAILED: "differ by 0.2"})
    with pytest.raises(ExportError, match="parity"):
        store.get(info)


def test_only_the_file_the_aggregator_signed_is_served(tmp_path: Path) -> None:
    signing.generate_keypair(tmp_path / "keys", "aggregator")
    signing.generate_keypair(tmp_path / "keys", "intruder")
    key = signing.load_private_key(tmp_path / "keys" / "aggregator.key")
    pub = signing.load_public_key(tmp_path / "keys" / "aggregator.pub")
    store = OnnxStore(tmp_path / "cache", Registry("http://unused"), pub)

    good = published("m", "3", b"the signed model", key)
    store._write_local(store.local_path(good), b"the signed model", 0.0)
    artifact = store.get(good)
    assert artifact.data == b"the signed model"
    assert artifact.signature.startswith("verified: signed by the aggregator for run run-1 round 2")

    # Retagged to another file (its digest in the tag, the old signature kept): refused.
    retagged = VersionInfo("m", "3", "r3", {**good.tags, TAG_SHA: sha256(b"another model")})
    with pytest.raises(UntrustedModel, match="forged"):
        store.get(retagged)
    # Version 3's genuine signature copied onto version 4 with the same file: refused.
    copied = VersionInfo("m", "4", "r4", {**good.tags})
    with pytest.raises(UntrustedModel, match="forged"):
        store.get(copied)
    # Unsigned, signed by another key, or garbage in the tag: refused.
    unsigned = published("m", "5", b"x")
    with pytest.raises(UntrustedModel, match="unsigned"):
        store.get(unsigned)
    intruder = signing.load_private_key(tmp_path / "keys" / "intruder.key")
    with pytest.raises(UntrustedModel, match="forged"):
        store.get(published("m", "6", b"x", intruder))
    with pytest.raises(UntrustedModel):
        store.get(VersionInfo("m", "7", "r7", {**unsigned.tags, TAG_SIGNATURE: "bm90IGl0"}))
    assert issubclass(UntrustedModel, ExportError)  # refused for good


def test_a_downloaded_file_must_match_the_signed_digest(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.artifacts

    def download(artifact_uri: str, dst_path: str, tracking_uri: str) -> str:
        out = Path(dst_path) / "model.onnx"
        out.write_bytes(b"swapped in the artifact store")
        return str(out)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download)
    store = OnnxStore(tmp_path, Registry("http://unused"))
    with pytest.raises(UntrustedModel, match="does not match"):
        store.get(published("m", "3", b"what the aggregator logged"))
    assert not store.local_path(published("m", "3", b"")).exists()


def test_predict_table_lists_files_labels_and_model() -> None:
    body = {"model": {"name": "leukofed-all", "version": "3", "alias": "champion"},
            "predictions": [{"filename": "a.jpg", "label": "Pre",
                             "probabilities": {"Benign": 0.1, "Early": 0.2, "Pre": 0.6,
                                               "Pro": 0.1}}]}
    table = format_table(body)
    assert "a.jpg" in table and "0.600" in table and "version 3 (champion)" in table
    assert "not a diagnosis" in table and "check unavailable" in table
    body["predictions"][0].update(refer=True, in_distribution=False,
                                  refer_reasons=["no stained white cell found"])
    table = format_table(body)
    assert "REFER to a hematologist" in table and "no stained white cell found" in table
    body["predictions"][0].update(refer=False, in_distribution=True, refer_reasons=[])
    assert "in distribution" in format_table(body)


class FakeRegistry:
    """Registry's read side: version 7 exists, no alias does."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def version(self, version: str) -> VersionInfo:
        self.calls.append(("version", version))
        if version != "7":
            raise RegistryError("no such version", "RESOURCE_DOES_NOT_EXIST", missing=True)
        return VersionInfo("m", version, f"run{version}", {"k": "v"})

    def alias(self, alias: str) -> VersionInfo | None:
        self.calls.append(("alias", alias))
        return None


def test_fixed_version_wins_over_the_alias_and_a_missing_alias_is_not_an_error(
        tmp_path: Path) -> None:
    from services.inference.model_source import ModelSource
    from services.inference.settings import InferenceSettings

    fixed = ModelSource(InferenceSettings(model_name="m", model_version="7",
                                          onnx_cache_dir=tmp_path))
    fixed._registry = FakeRegistry()
    info = fixed._resolve_registry()
    assert info.version == "7" and info.run_id == "run7"
    assert fixed._registry.calls[0][0] == "version"
    gone = ModelSource(InferenceSettings(model_name="m", model_version="8",
                                         onnx_cache_dir=tmp_path))
    gone._registry = FakeRegistry()
    assert gone._resolve_registry() is None

    follow = ModelSource(InferenceSettings(model_name="m", onnx_cache_dir=tmp_path))
    follow._registry = FakeRegistry()
    assert follow._resolve_registry() is None
    assert follow.refresh() is None and "alias 'champion'" in follow.status
