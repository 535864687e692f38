"""Patient-safe splits: whole blocks per split, stratified, seeded and reproducible."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from leukofed.data import scan_dataset
from leukofed.labels import CLASSES
from leukofed.splits import SPLIT_NAMES, group_split, read_manifest, write_manifest


def _groups(split, name):
    return {r.group for r in split[name]}


def test_no_group_in_two_splits_and_every_class_everywhere(synthetic_dataset) -> None:
    ds = scan_dataset(synthetic_dataset(per_class=80), block_size=8)
    split = group_split(ds.records, 0.2, 0.2, seed=3)
    for a in SPLIT_NAMES:
        for b in SPLIT_NAMES:
            if a < b:
                assert not _groups(split, a) & _groups(split, b)
    assert sum(len(split[n]) for n in SPLIT_NAMES) == len(ds.records)
    for name in SPLIT_NAMES:
        assert {r.label for r in split[name]} == set(range(len(CLASSES)))
    assert 0.1 < len(split.test) / len(ds.records) < 0.3


def test_split_is_reproducible_and_seed_dependent(synthetic_dataset) -> None:
    ds = scan_dataset(synthetic_dataset(per_class=80), block_size=8)
    a, b = group_split(ds.records, seed=1), group_split(ds.records, seed=1)
    c = group_split(ds.records, seed=2)
    assert [r.path for r in a.test] == [r.path for r in b.test]
    assert [r.path for r in a.test] != [r.path for r in c.test]


def test_byte_identical_images_never_in_two_splits(synthetic_dataset) -> None:
    root = synthetic_dataset(per_class=60)
    # Copies under far-away numbers would land in other blocks if they were kept.
    for i in range(1, 6):
        early = root / "Early"
        shutil.copy(early / f"img-Early-{i:03d}.png", early / f"img-Early-{900 + i}.png")
    ds = scan_dataset(root, block_size=4)
    split = group_split(ds.records, seed=0)
    hashes = [{r.sha256 for r in split[n]} for n in SPLIT_NAMES]
    assert not hashes[0] & hashes[1]
    assert not hashes[0] & hashes[2]
    assert not hashes[1] & hashes[2]


def test_manifest_round_trip(synthetic_dataset, tmp_path: Path) -> None:
    ds = scan_dataset(synthetic_dataset(per_class=20))
    split = group_split(ds.records, seed=0)
    write_manifest(tmp_path / "split.json", ds, split, seed=0, block_size=16)
    again = read_manifest(tmp_path / "split.json")
    for name in SPLIT_NAMES:
        assert [(r.path, r.label, r.sha256) for r in again[name]] == [
            (r.path, r.label, r.sha256) for r in split[name]]


def test_bad_fractions_rejected(synthetic_dataset) -> None:
    ds = scan_dataset(synthetic_dataset(per_class=4))
    with pytest.raises(ValueError):
        group_split(ds.records, 0.6, 0.5)


@pytest.mark.realdata
def test_real_data_no_block_in_two_splits(real_data: Path) -> None:
    ds = scan_dataset(real_data, verify=False)
    split = group_split(ds.records, seed=0)
    assert not _groups(split, "train") & _groups(split, "test")
    assert not _groups(split, "train") & _groups(split, "val")
    assert not _groups(split, "val") & _groups(split, "test")
    assert 0.12 < len(split.test) / len(ds.records) < 0.18
