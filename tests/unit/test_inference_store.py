"""The ONNX store's local cache, its checksum guard, and the CLI's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.inference.cli import format_table
from services.inference.onnx_store import (
    TAG_PARITY_FAILED,
    ExportError,
    OnnxStore,
    VersionInfo,
    parity_images,
)


class NoClient:
    def __getattr__(self, name: str) -> None:
        raise AssertionError(f"MLflow client used: {name}")


def test_local_cache_is_keyed_by_run_and_checked(tmp_path: Path) -> None:
    store = OnnxStore(tmp_path, NoClient(), "http://unused")
    info = VersionInfo("m", "3", "abc", {})
    path = store.local_path(info)
    assert path.parent.name == "v3-abc"  # a fresh MLflow reusing "3" gets another run id
    store._write_local(path, b"onnx-bytes", 1e-7)
    hit = store.get(info)
    assert hit.origin == "local-cache" and hit.data == b"onnx-bytes"
    path.write_bytes(b"tampered")
    assert store._read_local(path) is None  # checksum mismatch: never served


def test_version_tagged_as_failing_parity_is_refused_without_export(tmp_path: Path) -> None:
    store = OnnxStore(tmp_path, NoClient(), "http://unused")
    info = VersionInfo("m", "4", "r", {TAG_PARITY_FAILED: "differ by 0.2"})
    with pytest.raises(ExportError, match="parity"):
        store.get(info)


def test_parity_images_default_and_from_a_folder(tmp_path: Path) -> None:
    from PIL import Image

    default = parity_images(16)
    assert default.shape == (8, 16, 16, 3) and default.dtype.name == "uint8"
    Image.new("RGB", (20, 30), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("skip me")
    real = parity_images(16, tmp_path)
    assert real.shape == (1, 16, 16, 3)


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


class FakeVersion:
    def __init__(self, version: str) -> None:
        self.version, self.run_id, self.tags = version, f"run{version}", {"k": "v"}


class FakeClient:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def get_model_version(self, name: str, version: str) -> FakeVersion:
        self.calls.append(("version", name, version))
        return FakeVersion(version)

    def get_model_version_by_alias(self, name: str, alias: str) -> FakeVersion:
        from mlflow.exceptions import MlflowException

        self.calls.append(("alias", name, alias))
        raise MlflowException(f"Registered model alias {alias} not found.")


def test_fixed_version_wins_over_the_alias_and_a_missing_alias_is_not_an_error(
        tmp_path: Path) -> None:
    from services.inference.model_source import ModelSource
    from services.inference.settings import InferenceSettings

    fixed = ModelSource(InferenceSettings(model_name="m", model_version="7",
                                          onnx_cache_dir=tmp_path))
    fixed._client = FakeClient()
    info = fixed._resolve_mlflow()
    assert info.version == "7" and info.run_id == "run7" and fixed._client.calls[0][0] == "version"

    follow = ModelSource(InferenceSettings(model_name="m", onnx_cache_dir=tmp_path))
    follow._client = FakeClient()
    assert follow._resolve_mlflow() is None
    assert follow.refresh() is None and "alias 'champion'" in follow.status
