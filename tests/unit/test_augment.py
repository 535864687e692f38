"""The training augmentation takes images as stored (uint8) without changing what it does."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from leukofed.train import NO_STAIN_BANK, _augment_function, make_dataset


@pytest.mark.parametrize("recipe", ["stain", "basic"])
def test_stored_bytes_and_floats_are_augmented_identically(recipe: str) -> None:
    x = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    outs = []
    for dtype in ("uint8", "float32"):
        tf.random.set_seed(3)  # the same random draws on both paths
        out = _augment_function(recipe, dtype)(tf.constant(x, tf.as_dtype(dtype)),
                                               tf.constant(NO_STAIN_BANK))
        outs.append(out.numpy())
    assert outs[0].dtype == np.float32
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], x.astype(np.float32))  # it did augment


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_training_batches_are_float_images_in_range_whatever_the_stored_type(dtype: type) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (8, 16, 16, 3)).astype(dtype)
    batches = list(make_dataset(x, rng.integers(0, 4, 8), 4, training=True))
    assert len(batches) == 2
    for xb, _ in batches:
        assert xb.dtype == tf.float32 and tuple(xb.shape) == (4, 16, 16, 3)
        assert float(tf.reduce_min(xb)) >= 0.0 and float(tf.reduce_max(xb)) <= 255.0


def test_a_batch_of_one_image_is_augmented_whether_or_not_it_gets_the_optics() -> None:
    """Half the images get another microscope's optics; in a batch of one, none often does
    (a hospital's last small batch), which once failed inside the blur."""
    x = tf.constant(np.random.default_rng(2).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8))
    augment = _augment_function("stain", "uint8")
    tf.random.set_seed(0)
    for _ in range(12):  # both branches, with probability 1 - 2 * 2**-12
        out = augment(x, tf.constant(NO_STAIN_BANK))
        assert tuple(out.shape) == (1, 16, 16, 3)
