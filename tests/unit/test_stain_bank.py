"""The federated stain bank's maths: per-image stain statistics, per-class moments that pool
exactly, and class-balanced draws from the pooled Gaussians."""

from __future__ import annotations

import numpy as np
import pytest

from leukofed.stain_bank import (
    MIN_IMAGES_PER_CLASS,
    class_stain_moments,
    draw_stain_bank,
    image_stain_stats,
)


def tinted(rng: np.random.Generator, n: int, rgb: tuple[int, int, int]) -> np.ndarray:
    base = np.array(rgb, np.float32)
    return np.clip(base + rng.normal(0, 12, (n, 16, 16, 3)), 0, 255).astype(np.uint8)


def test_image_stain_stats_are_the_log_mean_and_spread_of_the_optical_density() -> None:
    x = np.full((1, 4, 4, 3), 127, np.uint8)
    x[0, :2, :, 0] = 63
    od = -np.log((x[0].astype(np.float64) + 1) / 256)
    want = np.log(np.concatenate([od.mean(axis=(0, 1)), od.std(axis=(0, 1)) + 1e-3]))
    np.testing.assert_allclose(image_stain_stats(x)[0], want, rtol=1e-4, atol=1e-3)


def test_moments_pool_exactly_across_hospitals() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([tinted(rng, 12, (200, 120, 220)), tinted(rng, 12, (120, 90, 200))])
    y = np.repeat([0, 2], 12)
    whole = class_stain_moments(x, y, 4)
    halves = class_stain_moments(x[::2], y[::2], 4) + class_stain_moments(x[1::2], y[1::2], 4)
    np.testing.assert_allclose(halves.total, whole.total)
    np.testing.assert_allclose(halves.outer, whole.outer)
    assert whole.count.tolist() == [12, 0, 12, 0]


def test_a_class_with_too_few_images_is_not_sent() -> None:
    rng = np.random.default_rng(1)
    n = MIN_IMAGES_PER_CLASS - 1
    x = np.concatenate([tinted(rng, n, (200, 120, 220)), tinted(rng, 10, (120, 90, 200))])
    m = class_stain_moments(x, np.repeat([0, 1], [n, 10]), 4)
    assert m.count.tolist() == [0, 10, 0, 0]
    assert not m.total[0].any() and not m.outer[0].any()


def test_bank_draws_every_pooled_class_equally_often_around_its_stain() -> None:
    rng = np.random.default_rng(2)
    pale, dark = tinted(rng, 40, (230, 200, 235)), tinted(rng, 10, (90, 40, 140))
    # Hospital a holds only pale images, b only dark ones: the bank mixes both, 1:1,
    # though the pale class has four times the images.
    moments = [class_stain_moments(pale, np.zeros(40, int), 4),
               class_stain_moments(dark, np.ones(10, int), 4)]
    bank = draw_stain_bank(moments, size=2000, seed=0)
    assert bank is not None and bank.shape == (2000, 2, 3)
    od_mean = bank[:, 0].mean(axis=1)
    centre = {name: float(np.exp(image_stain_stats(v)[:, :3]).mean())
              for name, v in (("pale", pale), ("dark", dark))}
    cut = (centre["pale"] + centre["dark"]) / 2
    share_dark = float((od_mean > cut).mean())
    assert 0.45 < share_dark < 0.55
    assert abs(np.median(od_mean[od_mean > cut]) - centre["dark"]) < 0.1 * centre["dark"]
    assert (bank > 0).all()


def test_no_bank_from_a_single_class() -> None:
    rng = np.random.default_rng(3)
    m = class_stain_moments(tinted(rng, 20, (200, 120, 220)), np.zeros(20, int), 4)
    assert draw_stain_bank([m]) is None


@pytest.mark.parametrize("seed", [0, 1])
def test_bank_is_reproducible_by_seed(seed: int) -> None:
    rng = np.random.default_rng(4)
    x = np.concatenate([tinted(rng, 10, (200, 120, 220)), tinted(rng, 10, (120, 90, 200))])
    m = [class_stain_moments(x, np.repeat([0, 3], 10), 4)]
    np.testing.assert_array_equal(draw_stain_bank(m, seed=seed), draw_stain_bank(m, seed=seed))


def test_stain_transfer_moves_images_to_the_bank_instead_of_the_batch() -> None:
    import tensorflow as tf

    from leukofed.train import _stain_transfer

    rng = np.random.default_rng(5)
    od = tf.constant(rng.uniform(0.1, 0.3, (8, 6, 6, 3)), tf.float32)
    mean = tf.reduce_mean(od, axis=[1, 2], keepdims=True)
    std = tf.math.reduce_std(od, axis=[1, 2], keepdims=True) + 1e-3
    target = np.array([[[2.0, 3.0, 4.0], [0.5, 0.5, 0.5]]], np.float32)  # far from any image
    moved = tf.reduce_mean(_stain_transfer(od, mean, std, tf.constant(target)), axis=[1, 2])
    ratio = moved.numpy() / target[0, 0]
    assert ((ratio > 0.74) & (ratio < 1.31)).all()  # the target, times the random 0.75-1.3
    # Without a bank, each image takes another image's statistics: nowhere near the target.
    kept = tf.reduce_mean(_stain_transfer(od, mean, std, tf.zeros([0, 2, 3])), axis=[1, 2])
    assert float(tf.reduce_max(kept)) < 0.3 * 1.31
