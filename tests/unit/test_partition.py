"""Hospital partitions: every image exactly once, whole blocks, reproducible by seed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from leukofed.cli import app
from leukofed.data import scan_dataset
from leukofed.partition import SCHEMES, partition_records, write_partition


@pytest.fixture
def records(synthetic_dataset):
    return scan_dataset(synthetic_dataset(per_class=96), block_size=4).records


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_image_once_and_blocks_whole(records, scheme: str) -> None:
    parts = partition_records(records, 3, scheme, alpha=0.5, seed=7)
    paths = [r.path for recs in parts.values() for r in recs]
    assert sorted(paths) == sorted(r.path for r in records)  # each image exactly once
    owner: dict[str, str] = {}
    for hospital, recs in parts.items():
        assert recs, f"hospital {hospital} is empty"
        for r in recs:
            assert owner.setdefault(r.group, hospital) == hospital  # a block in one hospital


def test_reproducible_by_seed(records) -> None:
    def names(p):
        return {h: [r.path.name for r in v] for h, v in p.items()}

    a = partition_records(records, 3, "dirichlet", 0.5, seed=1)
    b = partition_records(records, 3, "dirichlet", 0.5, seed=1)
    c = partition_records(records, 3, "dirichlet", 0.5, seed=2)
    assert names(a) == names(b)
    assert names(a) != names(c)


def test_dirichlet_skews_labels_iid_does_not(records) -> None:
    def spread(parts):  # std of each class's share across hospitals, averaged
        counts = np.array(
            [[sum(r.label == k for r in v) for k in range(4)] for v in parts.values()]
        )
        shares = counts / counts.sum(axis=0)
        return shares.std(axis=0).mean()

    iid = partition_records(records, 3, "iid", 1.0, seed=0)
    skew = partition_records(records, 3, "dirichlet", 0.1, seed=0)
    assert spread(iid) < 0.05
    assert spread(skew) > 0.15


def test_cli_writes_links_manifest_and_table(synthetic_dataset, tmp_path: Path) -> None:
    src = synthetic_dataset(per_class=32)
    out = tmp_path / "hospitals"
    result = CliRunner().invoke(app, ["data", "partition", str(src), str(out), "--hospitals", "2",
                                      "--scheme", "iid", "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert "hospital" in result.output and "Benign" in result.output
    links = [p for p in out.rglob("*.png")]
    assert len(links) == 128 and all(p.is_symlink() for p in links)
    assert all(os.path.realpath(p).startswith(str(src)) for p in links)
    manifest = json.loads((out / "partition.json").read_text())
    assert sum(h["count"] for h in manifest["hospitals"].values()) == 128
    # A second run refuses to mix partitions unless --force.
    again = CliRunner().invoke(app, ["data", "partition", str(src), str(out)])
    assert again.exit_code != 0 and "not empty" in again.output
    forced = CliRunner().invoke(app, ["data", "partition", str(src), str(out), "--force",
                                      "--hospitals", "4"])
    assert forced.exit_code == 0, forced.output
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["a", "b", "c", "d"]


def test_write_partition_refuses_non_empty(records, tmp_path: Path) -> None:
    parts = partition_records(records, 2, "iid", 1.0, seed=0)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("user file")
    with pytest.raises(FileExistsError):
        write_partition(parts, tmp_path / "x", {})
