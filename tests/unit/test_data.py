"""Dataset reading: bad files reported and skipped, naming variants, duplicates, fingerprint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from leukofed.data import scan_dataset
from leukofed.labels import CLASSES, canonical_class

VARIANT_FOLDERS = ("Benign", "[Malignant] early Pre-B", "[Malignant] Pre-B", "[Malignant] Pro-B")


def test_both_naming_variants_map_to_canonical_classes() -> None:
    for canonical, variant in zip(CLASSES, VARIANT_FOLDERS, strict=True):
        assert canonical_class(canonical) == canonical
        assert canonical_class(variant) == canonical
        assert canonical_class(variant.upper()) == canonical
    assert canonical_class("[malignant]  EARLY   pre-b") == "Early"
    assert canonical_class("thumbnails") is None


def test_variant_dataset_has_same_classes_and_fingerprint(synthetic_dataset, tmp_path) -> None:
    plain = synthetic_dataset(per_class=3, root=tmp_path / "plain")
    variant = tmp_path / "variant"
    for src, dst in zip(CLASSES, VARIANT_FOLDERS, strict=True):
        shutil.copytree(plain / src, variant / dst)
    a, b = scan_dataset(plain), scan_dataset(variant)
    assert a.class_counts() == b.class_counts() == {c: 3 for c in CLASSES}
    assert a.fingerprint == b.fingerprint  # content and labels, not paths


def test_bad_files_are_reported_and_skipped(synthetic_dataset) -> None:
    root = synthetic_dataset(per_class=2)
    good = next((root / "Pre").glob("*.png")).read_bytes()
    (root / "Pre" / "empty-100.png").write_bytes(b"")
    (root / "Pre" / "truncated-101.png").write_bytes(good[: len(good) // 2])
    (root / "Pre" / "garbage-102.jpg").write_bytes(b"this is not a jpeg at all")
    (root / "Pre" / "notes.txt").write_text("hello")
    ds = scan_dataset(root)
    reasons = {b.path.name: b.reason for b in ds.bad_files}
    assert set(reasons) == {"empty-100.png", "truncated-101.png", "garbage-102.jpg", "notes.txt"}
    assert "empty" in reasons["empty-100.png"]
    assert "not an image file type" in reasons["notes.txt"]
    assert ds.class_counts() == {c: 2 for c in CLASSES}  # the run goes on with the good ones


def test_byte_identical_files_are_deduplicated(synthetic_dataset) -> None:
    root = synthetic_dataset(per_class=3)
    original = root / "Pro" / "img-Pro-001.png"
    shutil.copy(original, root / "Pro" / "img-Pro-900.png")
    ds = scan_dataset(root)
    assert ds.class_counts()["Pro"] == 3
    assert [(d.name, k.name) for d, k in ds.duplicates] == [("img-Pro-900.png", original.name)]


def test_groups_are_blocks_of_file_numbers(synthetic_dataset) -> None:
    root = synthetic_dataset(per_class=40)
    ds = scan_dataset(root, block_size=16)
    groups = {r.path.name: r.group for r in ds.records if r.class_name == "Early"}
    assert groups["img-Early-001.png"] == groups["img-Early-015.png"]  # numbers 1..15: block 0
    assert groups["img-Early-015.png"] != groups["img-Early-016.png"]
    assert len({g for g in groups.values()}) == 3  # 1-15, 16-31, 32-40


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "misc").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        scan_dataset(tmp_path)


@pytest.mark.realdata
def test_real_dataset_reads_cleanly(real_data: Path) -> None:
    ds = scan_dataset(real_data, verify=False)
    counts = ds.class_counts()
    assert all(counts[c] > 300 for c in CLASSES)
    assert len(ds.duplicates) > 0  # the README warns that some neighbours are identical
    assert len({r.sha256 for r in ds.records}) == len(ds.records)
