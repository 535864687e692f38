"""Simulated laboratories: deterministic by seed, structure intact, inside vs outside, applied
when a hospital reads its images, written by `data partition --labs` as JSON next to links."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from scipy.ndimage import gaussian_filter
from typer.testing import CliRunner

from leukofed.cli import app
from leukofed.data import scan_dataset
from leukofed.labs import (
    ACQUISITION_FILE,
    INSIDE,
    UNSEEN_LAB_DIR,
    Acquisition,
    AcquisitionError,
    apply_batch,
    draw_acquisition,
    draw_labs,
    load_acquired_image,
    load_acquisition,
    unseen_lab,
    write_acquisition,
)


def smear(seed: int = 0, size: int = 224) -> np.ndarray:
    """A blood-smear-like image: pink background, pale red cells, a few dark purple cells."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.empty((size, size, 3))
    img[:] = (236, 226, 238)
    for colour, n, radius in (((215, 170, 185), 25, 11), ((120, 60, 165), 5, 16)):
        for _ in range(n):
            cy, cx = rng.uniform(0, size, 2)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = colour
    img = gaussian_filter(img, (0.8, 0.8, 0)) + rng.normal(0, 3, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def structure_r(out: np.ndarray, original: np.ndarray) -> float:
    """How well the output's channels linearly explain the original's grayscale structure at
    cell scale (band-pass, so smooth illumination fields and blur of noise do not count)."""

    def band(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(a, 2) - gaussian_filter(a, 12)

    o = np.stack([band(out[..., c].astype(float)) for c in range(3)], -1).reshape(-1, 3)
    g = band(original.astype(float).mean(2)).ravel()
    a = np.c_[o, np.ones(len(o))]
    coef, *_ = np.linalg.lstsq(a, g, rcond=None)
    return float(np.corrcoef(a @ coef, g)[0, 1])


# ---------------------------------------------------------------- the transform


def test_default_is_identity_and_dict_round_trip() -> None:
    img = smear()
    assert Acquisition().is_identity
    assert np.array_equal(Acquisition().apply(img), img)
    lab = unseen_lab(3, "outside")
    text = json.dumps(lab.to_dict())  # JSON-serialisable as is
    again = Acquisition.from_dict(json.loads(text))
    assert again == lab and again.key() == lab.key() and again.kind == "outside"
    assert np.array_equal(again.apply(img), lab.apply(img))


def test_same_seed_same_bytes_different_seed_differs() -> None:
    img = smear(1)
    a, b, c = draw_labs(3, seed=5), draw_labs(3, seed=5), draw_labs(3, seed=6)
    assert list(a) == ["a", "b", "c"]
    assert a == b and a != c
    for h in a:
        assert a[h].apply(img).tobytes() == b[h].apply(img).tobytes()
        assert a[h].apply(img).tobytes() != c[h].apply(img).tobytes()
    assert len({lab.key() for lab in a.values()}) == 3  # three different laboratories
    assert unseen_lab(5) == unseen_lab(5) and unseen_lab(5) != unseen_lab(6)
    assert unseen_lab(5).key() not in {lab.key() for lab in a.values()}
    # Adding hospitals leaves the existing laboratories alone.
    assert draw_labs(5, seed=5)["b"] == a["b"]
    # Noise is seeded by the transform and the image: repeatable, yet not one fixed pattern.
    noisy = Acquisition(noise_std=4.0)
    assert noisy.apply(img).tobytes() == noisy.apply(img).tobytes()
    other = smear(2)
    assert not np.array_equal(noisy.apply(img).astype(int) - img, noisy.apply(other).astype(int)
                              - other)


@pytest.mark.parametrize("kind, min_r", [("inside", 0.9), ("outside", 0.6)])
def test_structure_stays(kind: str, min_r: float) -> None:
    """Only colour, light, sharpness and compression change: every cell stays in place."""
    img = smear(4)
    for seed in range(8):
        out = unseen_lab(seed, kind).apply(img)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert structure_r(out, img) >= min_r, (kind, seed)
    # Monotone: a stain change alone maps each channel's values through an increasing curve.
    out = Acquisition(od_matrix=((1.3, 0, 0), (0, 1.1, 0), (0, 0, 0.8))).apply(img)
    for c in range(3):
        order = np.argsort(img[..., c].ravel(), kind="stable")
        assert np.all(np.diff(out[..., c].ravel()[order].astype(int)) >= 0)


def test_outside_lies_beyond_inside() -> None:
    img = smear(5)

    def colour_distance(lab: Acquisition) -> float:
        return float(np.abs(lab.apply(img).astype(float).mean((0, 1))
                            - img.astype(float).mean((0, 1))).sum())

    rng = np.random.default_rng(0)
    inside = [draw_acquisition(rng, "inside") for _ in range(12)]
    outside = [draw_acquisition(rng, "outside") for _ in range(12)]
    d_in = np.mean([colour_distance(a) for a in inside])
    d_out = np.mean([colour_distance(a) for a in outside])
    assert d_out > 2 * d_in, (d_in, d_out)
    for a in outside:  # every drawn parameter leaves the inside interval
        assert a.blur_sigma > INSIDE["blur_sigma"][1]
        assert a.jpeg_quality < INSIDE["jpeg_quality"][0]
        assert a.vignette > INSIDE["vignette"][1] and a.noise_std > INSIDE["noise_std"][1]
        assert not INSIDE["gamma"][0] <= a.gamma <= INSIDE["gamma"][1]
        assert not INSIDE["brightness"][0] <= a.brightness <= INSIDE["brightness"][1]
    for a in inside:
        assert all(abs(a.od_matrix[i][j] - (i == j) * a.od_matrix[i][i]) <= 0.1
                   for i in range(3) for j in range(3))
    with pytest.raises(ValueError, match="unknown kind"):
        draw_acquisition(rng, "sideways")


def test_apply_batch_matches_apply_and_approximates_full_resolution() -> None:
    imgs = np.stack([smear(s) for s in range(3)])
    lab = unseen_lab(2)
    out = apply_batch(imgs, lab)
    assert out.shape == imgs.shape and out.dtype == np.uint8
    assert all(np.array_equal(out[i], lab.apply(imgs[i])) for i in range(3))
    assert np.array_equal(apply_batch(imgs, None), imgs)
    assert apply_batch(imgs[:0], lab).shape == (0, 224, 224, 3)
    with pytest.raises(ValueError, match="uint8"):
        apply_batch(imgs.astype(np.float32), lab)
    # At model-input size it approximates "apply at 224 px, then resize" (load_arrays' way).
    small = np.stack([np.asarray(Image.fromarray(im).resize((64, 64), Image.BILINEAR))
                      for im in imgs])
    full = np.stack([np.asarray(Image.fromarray(lab.apply(im)).resize((64, 64), Image.BILINEAR))
                     for im in imgs])
    assert np.abs(apply_batch(small, lab).astype(float) - full).mean() < 6.0


@pytest.mark.parametrize("data, message", [
    ({"name": "x"}, "format"),
    ({"format": "leukofed-acquisition/1", "blur": 2.0}, "unknown acquisition fields"),
    ({"format": "leukofed-acquisition/1", "jpeg_quality": 300}, "jpeg_quality"),
    ({"format": "leukofed-acquisition/1", "od_matrix": [[1, 0], [0, 1]]}, "od_matrix"),
    ({"format": "leukofed-acquisition/1", "brightness": "bright"}, "brightness"),
    ({"format": "leukofed-acquisition/1", "gamma": float("nan")}, "gamma"),
    ([1, 2, 3], "JSON object"),
])
def test_malformed_descriptions_are_refused(data: object, message: str) -> None:
    with pytest.raises(AcquisitionError, match=message):
        Acquisition.from_dict(data)  # type: ignore[arg-type]


def test_files_name_themselves_in_errors(tmp_path: Path) -> None:
    path = write_acquisition(tmp_path / "lab" / ACQUISITION_FILE, unseen_lab(1))
    assert load_acquisition(path) == unseen_lab(1)
    path.write_text("{not json")
    with pytest.raises(AcquisitionError, match=f"{path}.*not readable JSON"):
        load_acquisition(path)
    path.write_text(json.dumps({"format": "leukofed-acquisition/1", "vignette": 2}))
    with pytest.raises(AcquisitionError, match=f"{path}.*vignette"):
        load_acquisition(path)
    with pytest.raises(AcquisitionError, match="not found"):
        load_acquisition(tmp_path / "missing.json")


def test_real_smear_keeps_its_cells(real_data: Path) -> None:
    img = np.asarray(Image.open(sorted((real_data / "Pre").iterdir())[0]).convert("RGB"))
    for seed in range(3):
        assert structure_r(unseen_lab(seed, "inside").apply(img), img) > 0.9
        assert structure_r(unseen_lab(seed, "outside").apply(img), img) > 0.5


# ---------------------------------------------------------------- partition


def _partition(src: Path, out: Path, *extra: str) -> None:
    result = CliRunner().invoke(app, ["data", "partition", str(src), str(out), "--hospitals", "3",
                                      "--scheme", "iid", "--seed", "0", "--block-size", "2",
                                      *extra])
    assert result.exit_code == 0, result.output


def test_partition_with_labs_writes_only_links_and_json(synthetic_dataset, tmp_path: Path
                                                         ) -> None:
    src = synthetic_dataset(per_class=12)
    out = tmp_path / "hospitals"
    _partition(src, out, "--labs", "--lab-seed", "9")
    files = [p for p in out.rglob("*") if not p.is_dir()]
    images = [p for p in files if p.suffix == ".png"]
    assert len(images) == 48 and all(p.is_symlink() for p in images)  # never a copy
    assert all(p.is_symlink() or p.suffix == ".json" for p in files)
    assert all(os.path.realpath(p).startswith(str(src)) for p in images)
    manifest = json.loads((out / "partition.json").read_text())
    labs = draw_labs(3, seed=9)
    for h, lab in labs.items():
        assert load_acquisition(out / h / ACQUISITION_FILE) == lab
        assert manifest["hospitals"][h]["acquisition"] == lab.to_dict()
        ds = scan_dataset(out / h, block_size=2)  # the JSON beside the class folders is fine
        assert not ds.bad_files and len(ds.records) == manifest["hospitals"][h]["count"]
    unseen_dir = out / UNSEEN_LAB_DIR
    assert sorted(p.name for p in unseen_dir.iterdir()) == [ACQUISITION_FILE]  # no images
    assert load_acquisition(unseen_dir / ACQUISITION_FILE) == unseen_lab(9, "inside")
    assert manifest["unseen_lab"]["acquisition"] == unseen_lab(9).to_dict()
    assert manifest["lab_seed"] == 9 and manifest["unseen_kind"] == "inside"
    # Same seed, same files: a rerun reproduces the laboratories byte for byte.
    again = tmp_path / "again"
    _partition(src, again, "--labs", "--lab-seed", "9")
    for h in [*labs, UNSEEN_LAB_DIR]:
        assert (again / h / ACQUISITION_FILE).read_bytes() == (
            out / h / ACQUISITION_FILE).read_bytes()
    # --force without --labs removes every acquisition file and the unseen lab's folder.
    _partition(src, out, "--force")
    assert not list(out.rglob(ACQUISITION_FILE)) and not unseen_dir.exists()
    assert "unseen_lab" not in json.loads((out / "partition.json").read_text())


def test_partition_without_labs_is_unchanged(synthetic_dataset, tmp_path: Path) -> None:
    src = synthetic_dataset(per_class=8)
    out = tmp_path / "hospitals"
    _partition(src, out)
    assert [p.name for p in out.rglob("*.json")] == ["partition.json"]
    manifest = json.loads((out / "partition.json").read_text())
    assert not {"lab_seed", "unseen_kind", "unseen_lab"} & set(manifest)
    assert all("acquisition" not in h for h in manifest["hospitals"].values())
    bad = CliRunner().invoke(app, ["data", "partition", str(src), str(tmp_path / "x"), "--labs",
                                   "--unseen-kind", "sideways"])
    assert bad.exit_code != 0 and "unseen-kind" in bad.output


# ---------------------------------------------------------------- reading images


def test_load_arrays_applies_the_lab_before_resizing(synthetic_dataset, tmp_path: Path) -> None:
    from leukofed.train import load_arrays

    records = scan_dataset(synthetic_dataset(per_class=3)).records
    lab = unseen_lab(0, "outside")
    cache = tmp_path / "cache"
    plain, y = load_arrays(records, 32, cache)
    x, y2 = load_arrays(records, 32, cache, acquisition=lab)
    assert np.array_equal(y, y2) and x.shape == plain.shape and not np.array_equal(x, plain)
    assert np.array_equal(x[0], load_acquired_image(records[0].path, 32, lab))
    assert len(list((cache / "images").glob("*.npy"))) == 2  # the lab is in the cache key
    again, _ = load_arrays(records, 32, cache, acquisition=lab)  # from the cache
    assert np.array_equal(again, x)
    # Without a lab the cache key is the one earlier versions wrote: old caches stay valid.
    old_key = hashlib.sha256(("|".join(r.sha256 for r in records) + "|32").encode())
    assert (cache / "images" / f"{old_key.hexdigest()[:24]}.npy").exists()


def _client(data: Path, tmp_path: Path, **settings: object):  # noqa: ANN202
    from services.client.hospital import HospitalClient
    from services.client.settings import ClientSettings

    return HospitalClient(ClientSettings(hospital_id="a", data_dir=data,
                                         state_dir=tmp_path / "state",
                                         cache_dir=tmp_path / "cache", block_size=2, **settings))


def test_client_reads_its_lab_from_the_data_dir(synthetic_dataset, tmp_path: Path) -> None:
    from leukofed.train import load_arrays

    data = synthetic_dataset(per_class=6)
    plain = _client(data, tmp_path)
    assert plain.acquisition is None
    x_plain, _ = plain.arrays("train", 32)
    lab = draw_labs(1, seed=3)["a"]
    write_acquisition(data / ACQUISITION_FILE, lab)
    client = _client(data, tmp_path)
    assert client.acquisition == lab
    ds, split = client.dataset()
    assert not ds.bad_files  # acquisition.json beside the class folders is no image
    x, y = client.arrays("train", 32)
    assert not np.array_equal(x, x_plain)
    assert np.array_equal(x, load_arrays(split.train, 32, None, acquisition=lab)[0])
    # The setting overrides the file in the data dir.
    other = write_acquisition(tmp_path / "other.json", unseen_lab(7))
    assert _client(data, tmp_path, acquisition_file=other).acquisition == unseen_lab(7)


def test_client_refuses_a_malformed_lab_at_start(synthetic_dataset, tmp_path: Path) -> None:
    data = synthetic_dataset(per_class=2)
    (data / ACQUISITION_FILE).write_text('{"format": "leukofed-acquisition/1", "gama": 2}')
    with pytest.raises(ValidationError, match=f"{data / ACQUISITION_FILE}.*unknown"):
        _client(data, tmp_path)
    (data / ACQUISITION_FILE).unlink()
    with pytest.raises(ValidationError, match="acquisition file not found"):
        _client(data, tmp_path, acquisition_file=tmp_path / "nope.json")
