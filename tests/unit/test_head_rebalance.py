"""The classifier-head rebalancing maths (leukofed.head_rebalance): pooling is exact, the
refitted head undoes a head biased against a class few hospitals hold, and what arrives from
a hospital is checked before it is pooled."""

from __future__ import annotations

import numpy as np
import pytest

from leukofed.head_rebalance import (
    FeatureStats,
    class_feature_stats,
    pool_feature_stats,
    refit_head,
)

C, D = 4, 16


def draw(counts: list[int], means: np.ndarray, rng: np.random.Generator
         ) -> tuple[np.ndarray, np.ndarray]:
    """Post-ReLU-like features: class means plus correlated noise."""
    mix = rng.normal(0, 0.4, (D, D))
    x = np.concatenate([means[c] + rng.normal(0, 1, (n, D)) @ mix for c, n in enumerate(counts)])
    return x, np.repeat(np.arange(C), counts)


def test_pooled_statistics_equal_those_of_the_pooled_images() -> None:
    rng = np.random.default_rng(0)
    means = rng.normal(0, 2, (C, D))
    parts = [draw(c, means, rng) for c in ([0, 40, 60, 0], [25, 0, 10, 70], [5, 5, 5, 5])]
    means_p, covs_p, counts = pool_feature_stats([class_feature_stats(x, y, C) for x, y in parts])
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    np.testing.assert_array_equal(counts, np.bincount(y, minlength=C))
    for c in range(C):
        np.testing.assert_allclose(means_p[c], x[y == c].mean(axis=0), atol=1e-10)
        np.testing.assert_allclose(covs_p[c], np.cov(x[y == c], rowvar=False), atol=1e-10)


def test_refit_undoes_a_head_biased_against_a_rare_class() -> None:
    rng = np.random.default_rng(1)
    means = rng.normal(0, 1.5, (C, D))
    # Class 0 is rare and held by one hospital: the averaged head pushes it down.
    parts = [draw(c, means, rng) for c in ([12, 80, 90, 0], [0, 60, 10, 120])]
    stats = [class_feature_stats(x, y, C) for x, y in parts]
    x_all = np.concatenate([p[0] for p in parts])
    y_all = np.concatenate([p[1] for p in parts])
    # A fair head (least squares on one-hot) then biased against class 0 by 4 logits.
    w = np.linalg.lstsq(np.c_[x_all, np.ones(len(x_all))], np.eye(C)[y_all], rcond=None)[0]
    weight, bias = (w[:-1] * 4).astype(np.float32), (w[-1] * 4).astype(np.float32)
    bias[0] -= 4.0
    x_test, y_test = draw([300] * C, means, rng)

    def recall0(wt: np.ndarray, b: np.ndarray) -> float:
        return float(((x_test @ wt + b).argmax(axis=1)[y_test == 0] == 0).mean())

    before = recall0(weight, bias)
    new_w, new_b = refit_head(weight, bias, *pool_feature_stats(stats), seed=0)
    after = recall0(new_w, new_b)
    balanced = np.mean([((x_test @ new_w + new_b).argmax(axis=1)[y_test == c] == c).mean()
                        for c in range(C)])
    assert before < 0.5, before
    assert after >= before + 0.3, (before, after)
    assert balanced >= 0.8, balanced
    assert new_w.dtype == np.float32 and new_w.shape == weight.shape


def test_a_class_no_hospital_holds_keeps_its_column() -> None:
    rng = np.random.default_rng(2)
    means = rng.normal(0, 2, (C, D))
    x, y = draw([30, 30, 30, 0], means, rng)
    weight, bias = rng.normal(0, 1, (D, C)), rng.normal(0, 1, C)
    new_w, new_b = refit_head(weight, bias, *pool_feature_stats([class_feature_stats(x, y, C)]))
    np.testing.assert_array_equal(new_w[:, 3], weight[:, 3])
    assert new_b[3] == bias[3]
    assert not np.allclose(new_w[:, :3], weight[:, :3])


@pytest.mark.parametrize("change, message", [
    ({"count": np.zeros(C + 1)}, "shape"),
    ({"outer": np.zeros((C, D, D - 1))}, "shape"),
    ({"total": np.full((C, D), np.nan)}, "not finite"),
    ({"count": -np.ones(C)}, "negative"),
])
def test_statistics_from_a_hospital_are_checked(change: dict, message: str) -> None:
    good = class_feature_stats(np.ones((8, D)), np.arange(8) % C, C).to_arrays()
    FeatureStats.from_arrays(good, C, D)
    with pytest.raises(ValueError, match=message):
        FeatureStats.from_arrays({**good, **change}, C, D)


def test_a_class_with_too_few_images_is_not_described() -> None:
    rng = np.random.default_rng(3)
    x, y = draw([2, 30, 30, 30], rng.normal(0, 2, (C, D)), rng)
    stats = class_feature_stats(x, y, C, min_rows=5)
    assert list(stats.count) == [0, 30, 30, 30]
    assert not stats.total[0].any() and not stats.outer[0].any()
