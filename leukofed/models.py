"""The model zoo, and saving a model together with the facts serving needs.

Every model takes float32 RGB 0-255 images (NHWC) and scales them inside the graph, so
training, the ONNX export and serving share one preprocessing (leukofed.preprocessing).

BatchNorm momentum: Keras defaults (0.99, 0.999 in MobileNetV2) move the moving mean and
variance so slowly that after a few hundred steps from scratch they are still near their
initial values (variance 1.0 while the real pre-BN variance is ~1e-3). Training accuracy
climbs, but inference-mode accuracy sits at the majority-class rate: the previous team's
"MobileNetV2 from scratch: 0.30". We set momentum 0.9 on every BatchNorm layer.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from leukofed.labels import CLASSES  # noqa: E402
from leukofed.preprocessing import PREPROCESSING  # noqa: E402
from leukofed.protocol import DEFAULT_IMAGE_SIZE  # noqa: E402,F401  (re-exported)

MODEL_NAMES = ("compact_cnn", "mobilenetv2", "efficientnetb0")
# The default recipe reads cells: 128 px (a white cell is 13+ px wide, 6-7 at 64 px), only
# the stained cells kept (CellFocus), stain-robust augmentation (leukofed.train). Chosen by
# the shortcut audit, not by test accuracy alone: docs/shortcuts.md.
DEFAULT_CELL_FOCUS = True
# Answer from the four right-angle rotations of the image, averaged: a smear has no "up",
# training sees all eight symmetries, and averaging them at inference measured +1.0 point of
# test accuracy for the default recipe (0.957 -> 0.967, docs/shortcuts.md) for 4x the
# inference compute. Training is unchanged: the layers are identities there.
DEFAULT_ROTATION_ENSEMBLE = True
AUGMENTATIONS = ("stain", "basic")
DEFAULT_AUGMENTATION = "stain"
DEFAULT_MODEL = "compact_cnn"  # best measured here: docs/benchmarks-central.md
BN_MOMENTUM = 0.9
METADATA_ENTRY = "leukofed.json"  # extra member inside the .keras zip


NORMS = ("batch", "group")


@keras.saving.register_keras_serializable(package="leukofed")
class CellFocus(keras.layers.Layer):
    """Keep the stained white cells and their rim; paint everything else one flat grey.

    The classes of this dataset differ by background tint, red cells and illumination as
    much as by the leukaemic cells (a model that saw only the background scored 0.68 on
    held-out blocks: docs/shortcuts.md). Part of the graph, so the ONNX model and serving
    do exactly what training did. Cells are the image's most purple pixels (red and blue
    above green, as in leukofed.stain.cell_mask), found relative to the image and made
    soft so that the mask has no hard edge."""

    def __init__(self, threshold: float = 1.5, softness: float = 0.25, rim: int = 7,
                 fill: float = 200.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold, self.softness, self.rim, self.fill = threshold, softness, rim, fill

    def call(self, x: Any) -> Any:
        r, g, b = x[..., 0:1], x[..., 1:2], x[..., 2:3]
        # Red AND blue above green: stained cells are purple; the red scale-bar text (red,
        # not blue) is not, so it cannot slip through as a "cell" (it marks some classes).
        purple = keras.ops.minimum((r + b) / 2.0, b) - g
        # Relative to the image itself, so a stain that is paler, darker or shifted as a
        # whole still finds its most purple pixels: the white cells.
        mean = keras.ops.mean(purple, axis=(1, 2, 3), keepdims=True)
        std = keras.ops.std(purple, axis=(1, 2, 3), keepdims=True)
        z = (purple - mean) / (std + 1.0)
        cells = keras.ops.sigmoid((z - self.threshold) / self.softness)
        # A square window's maximum is the maximum along rows of the maximum along columns:
        # the same numbers from 2 x rim comparisons per pixel instead of rim squared.
        near = keras.ops.max_pool(cells, (self.rim, 1), strides=1, padding="same")
        near = keras.ops.max_pool(near, (1, self.rim), strides=1, padding="same")
        return near * x + (1.0 - near) * self.fill

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "threshold": self.threshold,
                "softness": self.softness, "rim": self.rim, "fill": self.fill}


@keras.saving.register_keras_serializable(package="leukofed")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """Keras' BatchNormalization, trained with TensorFlow's fused kernel.

    Keras 3 computes a training-mode BatchNorm from separate moment, normalise and
    update ops, forward and backward: measured 68 of a 145 ms train step of the compact CNN
    (batch 32, 128 px, this 2-core CPU); the fused kernel and its fused gradient take 30 ms
    of that back (``make bench-train-speed``). Same variables, same names, same moving
    statistics (the biased batch variance, as Keras keeps), so checkpoints, the wire format
    and FedAvg's BatchNorm handling are unchanged; inference (and so the ONNX export) runs
    Keras' own code. Anything the fused kernel does not cover (masks, renorm, a
    non-channels-last axis, float16 inputs) runs Keras' code too."""

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        fusable = (training and self.trainable and mask is None and not self.renorm
                   and self.scale and self.center and inputs.dtype == "float32"
                   and len(inputs.shape) == 4 and self.axis in (-1, 3))
        if not fusable:
            return super().call(inputs, training=training, mask=mask)
        empty = tf.constant([], tf.float32)
        outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=self.gamma.value, offset=self.beta.value, mean=empty,
            variance=empty, epsilon=self.epsilon, is_training=True, data_format="NHWC")
        # The kernel returns the unbiased variance (for tf.keras 2's moving average); Keras 3
        # keeps the biased one.
        n = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
        variance = variance * (n - 1.0) / tf.maximum(n, 1.0)
        m = self.momentum
        self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
        self.moving_variance.assign(self.moving_variance * m + variance * (1.0 - m))
        return outputs


def compact_cnn(inputs: keras.KerasTensor, width: int = 16, norm: str = "batch",
                stem_stride: int = 1) -> keras.KerasTensor:
    """Four conv blocks (conv-norm-ReLU x2, max-pool): ~0.3M parameters at width 16.

    ``norm="group"`` uses GroupNormalization (8 groups): no moving statistics, so nothing
    data-dependent sits outside the weights. Differential privacy needs that: clipping an
    update whose BatchNorm statistics must travel from 1.0 to ~1e-3 shrinks everything else.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {NORMS}")
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    for i, filters in enumerate((width, width * 2, width * 4, width * 8)):
        for j in range(2 if i else 1):
            stride = stem_stride if i == j == 0 else 1
            x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                                    name=f"block{i}_conv{j}")(x)
            if norm == "group":
                x = keras.layers.GroupNormalization(groups=8, name=f"block{i}_gn{j}")(x)
            else:
                x = FusedBatchNormalization(name=f"block{i}_bn{j}")(x)
            x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    return keras.layers.GlobalAveragePooling2D()(x)


@keras.saving.register_keras_serializable(package="leukofed")
class RotationStack(keras.layers.Layer):
    """At inference, the batch and its 90, 180 and 270 degree rotations, stacked along the
    batch (N -> 4N); the identity in training. No weights: checkpoints are unchanged."""

    def call(self, x: Any, training: bool | None = None) -> Any:
        if training:
            return x
        turned = [x]
        for _ in range(3):  # a quarter turn: swap height and width, flip the new height
            turned.append(keras.ops.flip(keras.ops.transpose(turned[-1], (0, 2, 1, 3)), 1))
        return keras.ops.concatenate(turned, axis=0)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape


@keras.saving.register_keras_serializable(package="leukofed")
class RotationMean(keras.layers.Layer):
    """At inference, the mean of the four rotations' probabilities (4N -> N); the identity
    in training."""

    def call(self, p: Any, training: bool | None = None) -> Any:
        if training:
            return p
        return keras.ops.mean(keras.ops.reshape(p, (4, -1, p.shape[-1])), axis=0)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape


def _backbone_output(
    name: str, inputs: keras.KerasTensor, image_size: int, alpha: float, weights: str | None,
    norm: str = "batch",
) -> keras.KerasTensor:
    shape = (image_size, image_size, 3)
    if name == "compact_cnn":
        if weights:
            raise ValueError("compact_cnn has no ImageNet weights")
        # At >= 128 px a stride-2 first convolution sees every input pixel (a white cell is
        # 13+ px wide at 128, 6-7 px at 64) at the cost of a 64 px network: measured 4x
        # faster than stride 1 at 128 px on this CPU (docs/shortcuts.md).
        return compact_cnn(inputs, norm=norm, stem_stride=2 if image_size >= 128 else 1)
    if norm != "batch":
        raise ValueError(f"{name} comes with BatchNorm only; norm='group' is for compact_cnn")
    if name == "mobilenetv2":
        x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)  # MobileNetV2 wants [-1, 1]
        backbone = keras.applications.MobileNetV2(
            input_shape=shape, alpha=alpha, include_top=False, weights=None
        )
    elif name == "efficientnetb0":
        x = inputs  # EfficientNet rescales and normalises inside its own graph
        backbone = keras.applications.EfficientNetB0(
            input_shape=shape, include_top=False, weights=None
        )
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")
    if weights:
        # ImageNet weights from a local file only (a no-top .h5 or .weights.h5); never fetched.
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        backbone.load_weights(str(path))
    x = backbone(x)
    return keras.layers.GlobalAveragePooling2D()(x)


def batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer (nested models included; the fused one is one too)."""
    return [la for la in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(la, keras.layers.BatchNormalization)]


def set_bn_momentum(model: keras.Model, momentum: float) -> int:
    """Set momentum on every BatchNormalization layer (nested models included)."""
    layers = batchnorm_layers(model)
    for layer in layers:
        layer.momentum = momentum
    return len(layers)


def build_model(
    name: str = DEFAULT_MODEL,
    image_size: int = DEFAULT_IMAGE_SIZE,
    alpha: float = 0.35,
    weights: str | None = None,
    bn_momentum: float | None = BN_MOMENTUM,
    dropout: float = 0.2,
    num_classes: int = len(CLASSES),
    seed: int | None = None,
    norm: str = "batch",
    cell_focus: bool = DEFAULT_CELL_FOCUS,
    rotation_ensemble: bool = DEFAULT_ROTATION_ENSEMBLE,
) -> keras.Model:
    """Build a classifier from scratch (or from local ImageNet backbone weights).

    ``bn_momentum=None`` keeps Keras' defaults: only for demonstrating the failure mode.
    ``rotation_ensemble`` adds weightless layers that average the four rotations at
    inference (in the graph, so the ONNX model and every evaluation do it too).
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3), name="image", dtype="float32")
    # CellFocus commutes with right-angle turns (per-pixel maths, whole-image statistics, a
    # centred square window), so it runs once, before the four rotations, not on each.
    x = CellFocus(name="cell_focus")(inputs) if cell_focus else inputs
    x = RotationStack(name="rotations")(x) if rotation_ensemble else x
    x = _backbone_output(name, x, image_size, alpha, weights, norm)
    if dropout:
        x = keras.layers.Dropout(dropout)(x)
    # float32 output even under a mixed-precision policy: softmax and the loss stay exact.
    outputs = keras.layers.Dense(
        num_classes, activation="softmax",
        name="probabilities", dtype="float32"
    )(x)
    if rotation_ensemble:  # weightless: the weight names (the wire format) do not change
        outputs = RotationMean(name="rotation_mean", dtype="float32")(outputs)
    model = keras.Model(inputs, outputs, name=name)
    if bn_momentum is not None:
        set_bn_momentum(model, bn_momentum)
    return model


def model_metadata(
    model: keras.Model, name: str, image_size: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What travels with a saved model: classes, input shape, preprocessing, architecture."""
    return {
        "format": "leukofed-model/1",
        "architecture": name,
        "classes": list(CLASSES),
        "image_size": image_size,
        "input_shape": [None, image_size, image_size, 3],
        "preprocessing": PREPROCESSING,
        "parameters": int(model.count_params()),
        **(extra or {}),
    }


def save_model(model: keras.Model, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Save as .keras with the metadata written into the same zip (one file to move around)."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError("model path must end with .keras")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.keras")
    model.save(tmp)
    with zipfile.ZipFile(tmp, "a") as zf:
        zf.writestr(METADATA_ENTRY, json.dumps(metadata, indent=1))
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    with zipfile.ZipFile(path) as zf:
        if METADATA_ENTRY not in zf.namelist():
            raise ValueError(f"{path} has no {METADATA_ENTRY}: not saved by leukofed")
        return json.loads(zf.read(METADATA_ENTRY))


def load_model(path: str | Path) -> tuple[keras.Model, dict[str, Any]]:
    """Load a model saved by save_model, with its metadata."""
    meta = read_metadata(path)
    return keras.models.load_model(path, compile=False), meta
