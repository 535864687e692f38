"""Model zoo: BatchNorm momentum fixed on purpose, metadata travels, local ImageNet weights."""

from __future__ import annotations

import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from leukofed.labels import CLASSES
from leukofed.models import (
    MODEL_NAMES,
    build_model,
    load_model,
    model_metadata,
    read_metadata,
    save_model,
)


def _bn_momenta(model: keras.Model) -> set[float]:
    return {layer.momentum for layer in model._flatten_layers()
            if isinstance(layer, keras.layers.BatchNormalization)}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_gets_bn_momentum_0_9(name: str) -> None:
    model = build_model(name, 32, seed=0)
    assert _bn_momenta(model) == {0.9}
    assert model.output_shape == (None, len(CLASSES))


def test_keras_defaults_are_what_we_override() -> None:
    # Documents the trap: MobileNetV2 ships with 0.999, which is why we set 0.9.
    assert _bn_momenta(build_model("mobilenetv2", 32, bn_momentum=None)) == {0.999}


def test_save_load_keeps_metadata_and_outputs(tmp_path: Path) -> None:
    model = build_model("compact_cnn", 32, seed=0)
    meta = model_metadata(model, "compact_cnn", 32, {"note": "x"})
    path = save_model(model, tmp_path / "m.keras", meta)
    assert "leukofed.json" in zipfile.ZipFile(path).namelist()
    loaded, meta2 = load_model(path)
    assert meta2["classes"] == list(CLASSES) and meta2["image_size"] == 32
    assert read_metadata(path)["note"] == "x"
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    assert _bn_momenta(loaded) == {0.9}


def test_imagenet_weights_load_from_a_local_file(tmp_path: Path) -> None:
    # Stand-in for a downloaded ImageNet no-top file: weights of another backbone instance.
    donor = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                           include_top=False, weights=None)
    path = tmp_path / "mobilenet_v2_no_top.weights.h5"
    donor.save_weights(path)
    model = build_model("mobilenetv2", 32, alpha=0.35, weights=str(path))
    backbone = next(la for la in model.layers if isinstance(la, keras.Model))
    for a, b in zip(backbone.get_weights(), donor.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError):
        build_model("mobilenetv2", 32, weights=str(tmp_path / "missing.h5"))
    with pytest.raises(ValueError, match="no ImageNet"):
        build_model("compact_cnn", 32, weights=str(path))
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet9000", 32)


def test_group_norm_compact_cnn_has_no_moving_statistics() -> None:
    model = build_model("compact_cnn", 32, norm="group", seed=0)
    assert not _bn_momenta(model)
    assert not [v for v in model.non_trainable_variables if "moving" in v.path]
    with pytest.raises(ValueError, match="is for compact_cnn"):
        build_model("mobilenetv2", 32, norm="group")
    with pytest.raises(ValueError, match="unknown norm"):
        build_model("compact_cnn", 32, norm="layer")


def _field(background: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Purple cells on a background; red text in a corner (as the scale bar)."""
    rng = np.random.default_rng(seed)
    img = np.empty((64, 64, 3), np.float32)
    img[:] = background
    yy, xx = np.mgrid[:64, :64]
    for cy, cx in ((16, 16), (40, 44), (20, 48)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = (120, 40, 170) + rng.normal(0, 3, 3)
    img[58:62, 40:60] = (230, 20, 20)
    return img


def test_cell_focus_keeps_the_cells_and_erases_the_slide() -> None:
    from leukofed.models import CellFocus, build_model

    layer = CellFocus()
    a, b = _field((235, 225, 240)), _field((200, 235, 215))  # same cells, other slides
    out_a, out_b = (np.asarray(layer(x[None]))[0] for x in (a, b))
    cell = (slice(14, 19), slice(14, 19))
    assert np.allclose(out_a[cell], a[cell], atol=2.0)  # cells pass through
    far = (slice(0, 6), slice(28, 36))  # plain background, away from any cell
    assert np.allclose(out_a[far], layer.fill, atol=1.0)
    assert np.allclose(out_b[far], layer.fill, atol=1.0)
    text = (slice(58, 62), slice(40, 60))  # red, not purple: not a cell
    assert np.allclose(out_a[text], layer.fill, atol=5.0)
    # What reaches the network hardly moves when the slide changes; the raw input does.
    assert np.abs(out_a - out_b).mean() < 0.25 * np.abs(a - b).mean()  # only the rims differ
    model = build_model("compact_cnn", 64, seed=0, cell_focus=True)
    assert model.get_layer("cell_focus") is not None


def test_rotation_ensemble_averages_the_four_rotations_at_inference_only() -> None:
    """Weightless layers: the same weights as the plain model, the mean of its answers on
    the four right-angle rotations at inference, the plain model in training."""
    import numpy as np

    from leukofed.models import build_model

    ensemble = build_model("compact_cnn", 32, seed=0, rotation_ensemble=True)
    plain = build_model("compact_cnn", 32, seed=1, rotation_ensemble=False)
    assert [w.path for w in ensemble.weights] == [w.path for w in plain.weights]
    rng = np.random.default_rng(0)
    plain.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype)
                       for w in ensemble.get_weights()])  # break the init's near-symmetry
    ensemble.set_weights(plain.get_weights())
    x = rng.uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    turns = [np.asarray(plain(np.ascontiguousarray(np.rot90(x, k, axes=(1, 2))),
                              training=False)) for k in range(4)]
    got = np.asarray(ensemble(x, training=False))
    assert np.allclose(got, np.mean(turns, axis=0), atol=1e-6)
    assert not np.allclose(got, turns[0], atol=1e-4)  # it is not just the plain answer
    assert got.shape == (3, 4) and np.allclose(got.sum(1), 1.0, atol=1e-5)
    assert ensemble(x, training=True).shape == (3, 4)  # training: one pass per image


def test_cell_focus_is_the_square_window_it_describes_and_commutes_with_turns() -> None:
    """The two one-dimensional max-pools give the 7x7 window's maximum; the layer gives the
    same answer on a turned image turned back, which lets it run before the rotations."""
    from scipy.ndimage import maximum_filter

    from leukofed.models import CellFocus

    layer = CellFocus()
    rng = np.random.default_rng(3)
    x = np.stack([_field((235, 225, 240)), _field((200, 235, 215))]).astype("float32")
    x += rng.normal(0, 4, x.shape).astype("float32")
    r, g, b = x[..., 0:1], x[..., 1:2], x[..., 2:3]
    purple = np.minimum((r + b) / 2, b) - g
    z = (purple - purple.mean(axis=(1, 2, 3), keepdims=True)) / (
        purple.std(axis=(1, 2, 3), keepdims=True) + 1.0)
    cells = 1 / (1 + np.exp(-(z - layer.threshold) / layer.softness))
    near = maximum_filter(cells, size=(1, layer.rim, layer.rim, 1), mode="nearest")
    expected = near * x + (1 - near) * layer.fill
    got = np.asarray(layer(x))
    assert np.allclose(got, expected, atol=1e-3)
    for k in (1, 2, 3):
        turned = np.asarray(layer(np.ascontiguousarray(np.rot90(x, k, axes=(1, 2)))))
        assert np.allclose(np.rot90(turned, -k, axes=(1, 2)), got, atol=1e-3)


def test_fused_batchnorm_trains_and_serves_exactly_as_keras_batchnorm() -> None:
    """The fused kernel is a speed-up only: same outputs, gradients and moving statistics
    (Keras keeps the biased batch variance; the kernel hands back the unbiased one)."""
    import tensorflow as tf

    from leukofed.models import FusedBatchNormalization

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(2.0, 3.0, (4, 3, 3, 5)).astype(np.float32))  # n = 36 a channel
    layers = [keras.layers.BatchNormalization(momentum=0.7), FusedBatchNormalization(momentum=0.7)]
    results = []
    for layer in layers:
        layer.build(x.shape)
        layer.gamma.assign(np.linspace(0.5, 2.0, 5, dtype=np.float32))
        layer.beta.assign(np.linspace(-1.0, 1.0, 5, dtype=np.float32))
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y * tf.range(1.0, 6.0))
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append([y, *grads, layer.moving_mean, layer.moving_variance,
                        layer(x, training=False)])
    for keras_value, fused_value in zip(*results):
        np.testing.assert_allclose(np.asarray(fused_value), np.asarray(keras_value),
                                   rtol=1e-4, atol=1e-4)
    # Frozen (not trainable) it runs in inference mode, as Keras' layer does.
    layers[1].trainable = False
    np.testing.assert_allclose(np.asarray(layers[1](x, training=True)),
                               np.asarray(layers[1](x, training=False)), rtol=1e-6)


def test_compact_cnn_batchnorm_is_the_fused_layer_with_unchanged_weight_names() -> None:
    from leukofed.models import FusedBatchNormalization

    model = build_model("compact_cnn", 64, seed=0)
    bns = [la for la in model._flatten_layers() if isinstance(la, keras.layers.BatchNormalization)]
    assert bns and all(isinstance(la, FusedBatchNormalization) for la in bns)
    assert [w.path for w in bns[0].weights] == [
        "block0_bn0/gamma", "block0_bn0/beta", "block0_bn0/moving_mean",
        "block0_bn0/moving_variance"]
