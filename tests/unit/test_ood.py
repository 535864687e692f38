"""The "refer" decision: acquisition profiles pool exactly, survive a round trip, and refer
every kind of image unlike the training data while answering ordinary test images."""

from __future__ import annotations

import numpy as np
import pytest

from leukofed.ood import (
    DEFAULT_MAX_SCALE_SHIFT,
    DESCRIPTORS,
    AcquisitionProfile,
    ProfileStats,
    descriptors,
)
from leukofed.probes import blank_field, demagnified, grayscale, magnified, natural_photos


def fields(n: int, seed: int, size: int = 64) -> np.ndarray:
    """Smear-like fields: light background, grey-blue red cells, a few purple white cells."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        img = np.full((size, size, 3), (228, 226, 238), float) + rng.normal(0, 3, (size, size, 3))
        for _ in range(int(rng.integers(25, 35))):
            cy, cx = rng.integers(0, size, 2)
            r2 = rng.uniform(6, 12)  # cells vary in size, as real ones do
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r2] = (185, 185, 215)
        for _ in range(int(rng.integers(2, 4))):
            cy, cx = rng.integers(6, size - 6, 2)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(14, 30)] = (125, 60, 175)
        out.append(img.clip(0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def profile() -> AcquisitionProfile:
    return AcquisitionProfile.from_stats(ProfileStats.of_images(fields(120, 1)))


def test_stats_pool_exactly_and_round_trip() -> None:
    a, b = fields(10, 2), fields(7, 3)
    pooled = ProfileStats.of_images(a).merge(ProfileStats.of_images(b))
    whole = ProfileStats.of_images(np.concatenate([a, b]))
    assert pooled.count == 17
    assert np.allclose(pooled.total, whole.total) and np.allclose(pooled.outer, whole.outer)
    again = ProfileStats.from_dict(pooled.to_dict())
    assert np.allclose(again.low, whole.low) and np.allclose(again.high, whole.high)
    p = AcquisitionProfile.from_stats(pooled)
    q = AcquisitionProfile.from_dict(p.to_dict())
    d = descriptors(a[:1])[0]
    assert q.judge(d) == p.judge(d)


@pytest.mark.parametrize("bad", [
    {"format": "other"},
    {"format": "leukofed-acquisition-profile/3", "names": ["red"]},
])
def test_malformed_stats_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        ProfileStats.from_dict(bad)


def test_wrong_shapes_and_non_finite_sums_are_refused() -> None:
    good = ProfileStats.of_images(fields(4, 4)).to_dict()
    with pytest.raises(ValueError, match="shapes"):
        ProfileStats.from_dict({**good, "total": [1.0, 2.0]})
    with pytest.raises(ValueError, match="non-finite"):
        ProfileStats.from_dict({**good, "total": [float("nan")] * len(DESCRIPTORS)})


def test_ordinary_fields_are_answered(profile: AcquisitionProfile) -> None:
    verdicts = profile.judge_images(fields(60, 9))
    assert np.mean([v.refer for v in verdicts]) <= 0.1
    assert all(v.reasons == () for v in verdicts if v.in_distribution)


@pytest.mark.parametrize("kind", ["grayscale", "blank", "photo", "magnified", "demagnified"])
def test_images_unlike_the_training_data_are_referred_with_a_reason(
        profile: AcquisitionProfile, kind: str) -> None:
    base = fields(12, 10)
    images = {
        "grayscale": lambda: np.stack([grayscale(im) for im in base]),
        "blank": lambda: np.stack([blank_field(im, i) for i, im in enumerate(base)]),
        "photo": lambda: natural_photos(64, 12, seed=0),
        "magnified": lambda: np.stack([magnified(im) for im in base]),
        "demagnified": lambda: np.stack([demagnified([base[(i + k) % 12] for k in range(4)])
                                         for i in range(12)]),
    }[kind]()
    verdicts = profile.judge_images(images)
    assert np.mean([v.refer for v in verdicts]) >= 0.9, kind
    assert all(v.reasons for v in verdicts if v.refer)


def test_the_reason_names_what_is_unusual(profile: AcquisitionProfile) -> None:
    verdict = profile.judge_images(blank_field(fields(1, 11)[0])[None])[0]
    assert verdict.refer
    assert any("stained white cell" in r for r in verdict.reasons)


def test_magnification_moves_the_scale_shift_its_own_way(profile: AcquisitionProfile) -> None:
    """Half the magnification scores positive and is called lower, twice scores negative and
    is called higher; ordinary fields sit near zero, in training standard deviations."""
    base = fields(12, 12)
    ordinary = [profile.judge(d).scale_shift for d in descriptors(fields(60, 13))]
    assert abs(np.mean(ordinary)) < 1.0 and 0.3 < np.std(ordinary) < 2.0
    lower = profile.judge_images(np.stack([
        demagnified([base[(i + k) % 12] for k in range(4)]) for i in range(12)]))
    higher = profile.judge_images(np.stack([magnified(im) for im in base]))
    assert all(v.scale_shift > DEFAULT_MAX_SCALE_SHIFT for v in lower)
    # A central crop of a synthetic field can hold almost no cell: most, not all, move.
    assert np.mean([v.scale_shift < -DEFAULT_MAX_SCALE_SHIFT for v in higher]) >= 0.75
    assert all(any("lower magnification" in r for r in v.reasons) for v in lower)
    assert all(any("higher magnification" in r for r in v.reasons)
               for v in higher if v.scale_shift < -DEFAULT_MAX_SCALE_SHIFT)


def test_a_profile_saved_before_the_scale_test_loads_with_its_default(
        profile: AcquisitionProfile) -> None:
    old = {k: v for k, v in profile.to_dict().items() if k != "max_scale_shift"}
    assert AcquisitionProfile.from_dict(old).max_scale_shift == DEFAULT_MAX_SCALE_SHIFT
    with pytest.raises(ValueError, match="max_scale_shift"):
        AcquisitionProfile.from_dict({**old, "max_scale_shift": 0})


@pytest.mark.realdata
@pytest.mark.parametrize("split_seed", [0, 1])
def test_refer_targets_on_the_real_data(real_data, split_seed: int) -> None:
    """The issue's targets on two block splits at 128 px: at most 5% of held-out test images
    referred; at least 95% of every out-of-distribution kind. Split 1 is the one where the
    bound chosen on split 0 alone referred 9.3% of test images."""
    from leukofed.data import scan_dataset
    from leukofed.labs import apply_batch, unseen_lab
    from leukofed.probes import probe_sets
    from leukofed.splits import group_split
    from leukofed.train import load_arrays

    split = group_split(scan_dataset(real_data, verify=False).records, seed=split_seed)
    train, _ = load_arrays(split.train, 128)
    test, _ = load_arrays(split.test, 128)
    profile = AcquisitionProfile.from_stats(ProfileStats.of_images(train))

    def referred(images: np.ndarray) -> float:
        return float(np.mean([v.refer for v in profile.judge_images(images)]))

    assert referred(test) <= 0.05
    subset = test[::4]
    shares = {k: referred(v) for k, v in probe_sets(subset, split_seed).items()}
    shares["outside_labs"] = float(np.mean([
        referred(apply_batch(subset[i::4], unseen_lab(split_seed + 100 + i, "outside")))
        for i in range(4)]))
    assert all(v >= 0.95 for v in shares.values()), shares
