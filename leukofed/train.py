"""The training step and the loops around it, shared by centralized and federated training.

Speed on a 2-core CPU comes from decoded images cached once as uint8 arrays (no JPEG
decoding per epoch), one tf.function train step and augmentation vectorised per batch
(benchmarks/bench_central.py measures it against a plain ``model.fit``). XLA
(``jit_compile``) is off by default: on this CPU it made MobileNetV2 @128 px 4.7x slower
(depthwise convolutions) and the compact CNN @128 px 1.7x slower; only the compact CNN at
64 px gained (~8%).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from leukofed.data import ImageRecord  # noqa: E402
from leukofed.head_rebalance import HEAD_LAYER  # noqa: E402
from leukofed.labels import CLASSES  # noqa: E402
from leukofed.labs import Acquisition, load_acquired_image  # noqa: E402
from leukofed.metrics import classification_metrics  # noqa: E402
from leukofed.models import (  # noqa: E402
    AUGMENTATIONS,
    DEFAULT_AUGMENTATION,
    DEFAULT_CELL_FOCUS,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_ROTATION_ENSEMBLE,
    batchnorm_layers,
)
from leukofed.preprocessing import load_image  # noqa: E402
from leukofed.strategies import cosine_lr  # noqa: E402  (one schedule for epochs and rounds)

log = logging.getLogger(__name__)
DEFAULT_CACHE = Path(os.environ.get("LEUKOFED_CACHE", ".cache"))


# ---------------------------------------------------------------- data


def load_arrays(
    records: Sequence[ImageRecord], image_size: int, cache_dir: str | Path | None = DEFAULT_CACHE,
    acquisition: Acquisition | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode records once to (uint8 images N x S x S x 3, int64 labels), cached on disk.

    The cache key covers the content hashes and the size, so a changed file or size
    never reuses stale pixels. ``acquisition`` (a simulated laboratory, leukofed.labs) is
    applied to each decoded image at its own resolution, before the resize, where its blur
    and JPEG are defined; its parameters join the cache key.
    """
    labels = np.array([r.label for r in records], dtype=np.int64)
    lab = "" if acquisition is None or acquisition.is_identity else f"|lab={acquisition.key()}"
    key = hashlib.sha256(
        ("|".join(r.sha256 for r in records) + f"|{image_size}" + lab).encode()
    ).hexdigest()[:24]
    cache = Path(cache_dir) / "images" / f"{key}.npy" if cache_dir else None
    if cache is not None and cache.exists():
        return np.load(cache), labels
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        images = list(pool.map(lambda r: load_acquired_image(r.path, image_size, acquisition)
                               if lab else load_image(r.path, image_size), records))
    x = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, x)
        tmp.replace(cache)
    return x, labels




def _dihedral(x: tf.Tensor) -> tf.Tensor:
    """Random flips and 90-degree turns per image: smears have no preferred orientation."""
    b = tf.shape(x)[0]

    def coin() -> tf.Tensor:
        return tf.random.uniform([b, 1, 1, 1]) < 0.5

    x = tf.where(coin(), tf.reverse(x, [2]), x)
    x = tf.where(coin(), tf.reverse(x, [1]), x)
    return tf.where(coin(), tf.transpose(x, [0, 2, 1, 3]), x)  # with flips: all 8 symmetries


def augment_basic(x: tf.Tensor) -> tf.Tensor:
    """The old recipe: dihedral transforms and a small colour jitter. It leaves the stain,
    so a model trained with it can (and does) classify by colour: docs/shortcuts.md."""
    return _jitter(tf.cast(_dihedral(x), tf.float32), contrast=0.1, brightness=0.08,
                   channel=0.04)


def _jitter(x: tf.Tensor, contrast: float, brightness: float, channel: float) -> tf.Tensor:
    """Per-image contrast around the mean, brightness shift (share of 255) and per-channel
    gain, each uniform in +-the given amount; clipped to 0-255."""
    b = tf.shape(x)[0]
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    c = tf.random.uniform([b, 1, 1, 1], 1.0 - contrast, 1.0 + contrast)
    shift = tf.random.uniform([b, 1, 1, 1], -brightness, brightness) * 255.0
    gain = tf.random.uniform([b, 1, 1, 3], 1.0 - channel, 1.0 + channel)
    return tf.clip_by_value(((x - mean) * c + mean + shift) * gain, 0.0, 255.0)


def _stain_transfer(od: tf.Tensor, mean: tf.Tensor, std: tf.Tensor,
                    bank: tf.Tensor) -> tf.Tensor:
    """Each image's optical densities moved to the statistics of another image of the batch
    (any class), or with a stain ``bank`` (M, 2, 3; M > 0) to one of its targets, scaled by
    a random factor: stain stops telling the classes apart."""
    b = tf.shape(od)[0]

    def from_batch() -> tuple[tf.Tensor, tf.Tensor]:
        perm = tf.random.shuffle(tf.range(b))
        return tf.gather(mean, perm), tf.gather(std, perm)

    def from_bank() -> tuple[tf.Tensor, tf.Tensor]:
        # A hospital's batch holds its own classes and laboratory only: the federation's
        # pooled stains (leukofed.stain_bank) stand in for the images it does not have.
        pick = tf.gather(bank, tf.random.uniform([b], 0, tf.shape(bank)[0], tf.int32))
        return (tf.reshape(pick[:, 0], [b, 1, 1, 3]), tf.reshape(pick[:, 1], [b, 1, 1, 3]))

    target_mean, target_std = tf.cond(tf.shape(bank)[0] > 0, from_bank, from_batch)
    target_mean *= tf.random.uniform([b, 1, 1, 3], 0.75, 1.3)
    target_std *= tf.random.uniform([b, 1, 1, 3], 0.75, 1.3)
    # Bounded so that a dense smear moved to a faint one's statistics is not washed out.
    scale = tf.clip_by_value(target_std / std, 0.5, 2.0)
    return (od - mean) * scale + target_mean


def _acquisition(x: tf.Tensor) -> tf.Tensor:
    """Another microscope and camera, per image: uneven illumination (vignetting and a
    gradient), a slight defocus and sensor noise, over the ranges of ``leukofed.labs.INSIDE``
    (blur at 224 px scaled to the image side). A hospital sees one laboratory only, so
    without this the model learns its own optics as part of "what a cell looks like"."""
    b, h, w = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
    v = tf.reshape(tf.linspace(-1.0, 1.0, h), [1, -1, 1, 1])
    u = tf.reshape(tf.linspace(-1.0, 1.0, w), [1, 1, -1, 1])
    vignette = tf.random.uniform([b, 1, 1, 1], 0.0, 0.25)
    angle = tf.random.uniform([b, 1, 1, 1], 0.0, 2.0 * math.pi)
    gradient = tf.random.uniform([b, 1, 1, 1], 0.0, 0.12)
    light = (1.0 - vignette * (u * u + v * v) / 2.0) * (
        1.0 + gradient * (u * tf.cos(angle) + v * tf.sin(angle)) / 2.0)
    x = x * light
    # Defocus: a blend of the image and its 3x3 Gaussian blur (sigma ~ 0.5 px at 128 px,
    # i.e. ~0.9 px at 224 px), by a random weight: a blur between none and that.
    k = tf.constant([0.25, 0.5, 0.25])
    kernel = tf.tile(tf.reshape(k[:, None] * k[None, :], [3, 3, 1, 1]), [1, 1, 3, 1])
    blurred = tf.nn.depthwise_conv2d(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], "SYMMETRIC"),
                                     kernel, [1, 1, 1, 1], "VALID")
    amount = tf.random.uniform([b, 1, 1, 1]) * tf.cast(tf.random.uniform([b, 1, 1, 1]) < 0.5,
                                                       tf.float32)
    x = x + amount * (blurred - x)
    noise = tf.random.uniform([b, 1, 1, 1], 0.0, 2.5)
    return tf.clip_by_value(x + noise * tf.random.normal(tf.shape(x)), 0.0, 255.0)


def augment_stain(x: tf.Tensor, bank: tf.Tensor) -> tf.Tensor:
    """The stain-robust recipe (default): dihedral, then stain transfer between images of
    any class in optical-density space, mostly with cells and background moved to
    different stains, and a common stain intensity (lighter or darker staining, as between
    laboratories); brightness, contrast, gamma and channel jitter; another microscope's
    illumination, focus and noise. No random crops (they change cell size, which the classes
    differ by) and no grayscale (CellFocus finds cells by their purple). Chosen by
    measurement: docs/shortcuts.md. ``bank``: the stain transfer's targets
    (``leukofed.stain_bank``), or ``NO_STAIN_BANK``: other images of the batch."""
    b = tf.shape(x)[0]
    x = tf.cast(_dihedral(x), tf.float32)  # on the stored bytes when given uint8: 4x less to move
    od = -tf.math.log((x + 1.0) / 256.0)
    mean = tf.reduce_mean(od, axis=[1, 2], keepdims=True)
    std = tf.math.reduce_std(od, axis=[1, 2], keepdims=True) + 1e-3
    r, g, bl = x[..., 0:1], x[..., 1:2], x[..., 2:3]
    cells = tf.sigmoid(((r + bl) / 2.0 - g - 30.0) / 5.0)  # soft purple-cell mask
    one = _stain_transfer(od, mean, std, bank)
    two = _stain_transfer(od, mean, std, bank)
    # Most transfers move cells and background to different stains: measured, 0.8 instead of
    # 0.5 took the spatial recolouring's loss from 6.6 to 3.8 points and the recoloured one
    # from 2.4 to 0.4 (docs/shortcuts.md); per-image normalisation cannot undo it.
    split = tf.random.uniform([b, 1, 1, 1]) < 0.8
    od_new = tf.where(split, cells * one + (1.0 - cells) * two, one)
    transfer = tf.random.uniform([b, 1, 1, 1]) < 0.8
    od = tf.where(transfer, od_new, od)
    # Laboratories stain lighter or darker as a whole (labs.INSIDE "intensity" 0.8-1.25,
    # so one lab to another is 0.64-1.56x): log-uniform over that ratio.
    od = od * tf.exp(tf.random.uniform([b, 1, 1, 1], math.log(0.65), math.log(1.55)))
    # A gamma on the transmitted light is a scale of the optical density ((e^-od)^g =
    # e^(-g od)), so it joins the intensity instead of costing a pow over every pixel.
    od = od * tf.random.uniform([b, 1, 1, 1], 0.7, 1.4)
    x = tf.clip_by_value(256.0 * tf.exp(-od) - 1.0, 0.0, 255.0)
    # No grayscale: the model's CellFocus finds cells by their purple, and a grayscale
    # photograph is referred as out of distribution (leukofed.ood) rather than answered.
    x = _jitter(x, contrast=0.3, brightness=0.12, channel=0.15)
    # Half the images keep this microscope's optics: measured, always applying them cost
    # ~1 point of test accuracy on the dataset's own acquisition.
    # (Computed on those images only: the optics cost a third of the recipe's time. None
    # chosen, as often in a hospital's last small batch, skips them: the blur's convolution
    # of an empty batch does not keep the padded shape it should drop.)
    chosen = tf.where(tf.random.uniform([b]) < 0.5)
    return tf.cond(
        tf.shape(chosen)[0] > 0,
        lambda: tf.tensor_scatter_nd_update(x, chosen, _acquisition(tf.gather_nd(x, chosen))),
        lambda: x)


def augment(x: tf.Tensor, recipe: str, bank: tf.Tensor) -> tf.Tensor:
    """A training batch (uint8 or float32, 0-255) augmented by ``recipe``, as float32."""
    if recipe == "stain":
        return augment_stain(x, bank)
    if recipe == "basic":
        return augment_basic(x)
    raise ValueError(f"unknown augmentation {recipe!r}; choose from {AUGMENTATIONS}")


# No stain targets: the stain transfer draws from the batch's own images.
NO_STAIN_BANK = np.zeros((0, 2, 3), np.float32)


def make_dataset(
    x: np.ndarray, y: np.ndarray, batch_size: int, training: bool, seed: int = 0,
    augmentation: str = DEFAULT_AUGMENTATION, stain_bank: np.ndarray | None = None,
) -> tf.data.Dataset:
    """Batches of ``(x, y)``; in ``training``, shuffled and augmented (``stain_bank``: the
    stain transfer's targets, ``leukofed.stain_bank``; None: the batch's own images)."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augmentation!r}; choose from {AUGMENTATIONS}")
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=training and len(x) >= batch_size)
    # Training batches reach the augmentation as stored (uint8 from load_arrays), which
    # turns them into float32 itself: its flips and turns then move a quarter of the bytes.
    stored = stored_dtype(x) if training else "float32"
    if stored == "float32":
        ds = ds.map(lambda a, b: (tf.cast(a, tf.float32), b),
                    num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        augment_batch = _augment_function(augmentation, stored)
        bank = tf.constant(NO_STAIN_BANK if stain_bank is None
                           else np.asarray(stain_bank, np.float32).reshape(-1, 2, 3))
        ds = ds.map(lambda a, b: (augment_batch(a, bank), b),
                    num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def stored_dtype(x: np.ndarray) -> str:
    """The augmentation's input type for images ``x``: "uint8" as stored by load_arrays
    (the cheap path), anything else as "float32"."""
    return "uint8" if x.dtype == np.uint8 else "float32"


@functools.cache
def _augment_function(recipe: str, dtype: str = "float32") -> Any:
    """The recipe as one tf.function for images of ``dtype`` ("uint8" or "float32"),
    traced once per process. Inlined into each new dataset's map it was traced again for
    every local fit: 0.4-0.5 s of a hospital's round (measured, benchmarks/bench_scale.py),
    more than the training itself on a small partition, and paid by every hospital every
    round. Called as ``f(images, bank)`` (``NO_STAIN_BANK`` or ``leukofed.stain_bank``
    targets); returns float32 images."""
    return tf.function(lambda x, bank: augment(x, recipe, bank),
                       input_signature=[tf.TensorSpec([None, None, None, 3], tf.as_dtype(dtype)),
                                        tf.TensorSpec([None, 2, 3], tf.float32)])


def logit_prior(y: np.ndarray, n_classes: int = len(CLASSES), floor: float = 1e-4
                ) -> np.ndarray:
    """Log class frequencies of ``y`` (absent classes at ``log(floor)``), for a
    logit-adjusted loss (balanced softmax; FedLC in federated learning).

    Training on ``log p + log prior`` makes the model's own output the class-balanced
    posterior whatever the local label mix, so every hospital's local optimum is the same
    function: a hospital with few Benign images no longer teaches the global model that
    Benign is rare, and a class it has none of gets almost no gradient (its adjusted
    probability is ~``floor`` times smaller), instead of being pushed down at every step.
    """
    return pooled_log_prior(np.bincount(y, minlength=n_classes), floor)


def pooled_log_prior(counts: np.ndarray, floor: float = 1e-4) -> np.ndarray:
    """``logit_prior`` from class counts (a federation's pooled counts, for example)."""
    counts = np.asarray(counts, np.float64)
    freq = counts / max(counts.sum(), 1.0)
    return np.log(np.maximum(freq, floor)).astype(np.float32)


def class_weights(y: np.ndarray, n_classes: int = len(CLASSES)) -> np.ndarray:
    """Inverse-frequency weights (mean 1 over present classes): a class-balanced loss."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return weights.astype(np.float32)


# ---------------------------------------------------------------- the step


def adjusted_cross_entropy(probs: tf.Tensor, y: tf.Tensor, log_prior: tf.Tensor) -> tf.Tensor:
    """Per-example cross-entropy of softmax(log p + log prior): with a zero prior, the plain
    cross-entropy of ``probs`` (clipped at 1e-7 as Keras does); with a class prior, the
    logit-adjusted loss whose minimiser makes ``probs`` the class-balanced posterior."""
    log_p = tf.math.log(tf.clip_by_value(probs, 1e-7, 1.0)) + log_prior
    return -tf.gather(tf.nn.log_softmax(log_p), tf.cast(y, tf.int32), batch_dims=1)


class Trainer:
    """Owns one model's optimizer and compiled train/predict steps.

    Reusable across federated rounds: ``reset`` loads new global weights, zeroes the
    optimizer state and sets the FedProx anchor without recompiling the step.
    """

    def __init__(
        self,
        model: keras.Model,
        learning_rate: float = 1e-3,
        jit_compile: bool = False,
        proximal_mu: float = 0.0,
    ) -> None:
        self.model = model
        self.optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
        self.optimizer.build(model.trainable_variables)
        self.proximal_mu = tf.Variable(proximal_mu, trainable=False, dtype=tf.float32)
        self.anchor = [
            tf.Variable(v.value, trainable=False) for v in model.trainable_variables
        ]
        self.class_weights = tf.Variable(tf.ones([len(CLASSES)]), trainable=False)
        # Logit adjustment (zeros: off): log of the class prior added to the log-probabilities
        # inside the loss, see ``logit_prior``.
        self.log_prior = tf.Variable(tf.zeros([len(CLASSES)]), trainable=False)
        self._train_step = tf.function(self._step, jit_compile=jit_compile)
        self._predict_step = tf.function(
            lambda x: model(x, training=False), jit_compile=jit_compile
        )

    def _step(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            loss, probs = self.loss(x, y)
            # FedProx: mu/2 * ||w - w_global||^2 keeps local models near the global one.
            prox = tf.add_n(
                [tf.reduce_sum(tf.square(v - a)) for v, a in zip(variables, self.anchor)]
            )
            loss_total = loss + 0.5 * self.proximal_mu * prox
        grads = tape.gradient(loss_total, variables)
        self._apply_gradients(grads, variables)
        correct = tf.reduce_sum(tf.cast(tf.argmax(probs, axis=1) == y, tf.float32))
        return loss, correct

    def loss(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(class-weighted, logit-adjusted loss of a training-mode forward pass, its
        probabilities): the train step's objective without the FedProx term."""
        probs = self.model(x, training=True)
        per_example = adjusted_cross_entropy(probs, y, self.log_prior)
        w = tf.gather(self.class_weights, y)
        return tf.reduce_sum(w * per_example) / tf.maximum(tf.reduce_sum(w), 1e-6), probs

    def _apply_gradients(self, grads: list[tf.Tensor], variables: list[tf.Variable]) -> None:
        """The optimizer step (traced into the train step); a subclass that corrects the
        gradients (SCAFFOLD in benchmarks/bench_fed_ablation.py) overrides only this."""
        self.optimizer.apply_gradients(zip(grads, variables))

    @property
    def learning_rate(self) -> float:
        return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        self.optimizer.learning_rate = value

    def reset(
        self,
        learning_rate: float | None = None,
        proximal_mu: float | None = None,
        class_weights: np.ndarray | None = None,
        log_prior: np.ndarray | None = None,
    ) -> None:
        """New round: zero optimizer state, anchor FedProx at the current weights."""
        lr = self.learning_rate
        for v in self.optimizer.variables:  # moments, iteration count and the lr itself
            v.assign(tf.zeros_like(v))
        self.learning_rate = lr if learning_rate is None else learning_rate
        for a, v in zip(self.anchor, self.model.trainable_variables):
            a.assign(v.value)
        if proximal_mu is not None:
            self.proximal_mu.assign(proximal_mu)
        if class_weights is not None:
            self.class_weights.assign(class_weights)
        self.log_prior.assign(np.zeros(len(CLASSES), np.float32) if log_prior is None
                              else np.asarray(log_prior, np.float32))

    def train_epoch(
        self, dataset: tf.data.Dataset, steps: int | None = None, progress: bool = False
    ) -> dict[str, float]:
        bar = keras.utils.Progbar(steps, stateful_metrics=["loss", "acc"]) if progress else None
        total_loss = total_correct = seen = 0.0
        start = time.perf_counter()
        for i, (xb, yb) in enumerate(dataset):
            loss, correct = self._train_step(xb, yb)
            n = int(yb.shape[0])
            total_loss += float(loss) * n
            total_correct += float(correct)
            seen += n
            if bar is not None:
                bar.update(i + 1, [("loss", total_loss / seen), ("acc", total_correct / seen)])
        seconds = time.perf_counter() - start
        return {
            "loss": total_loss / max(seen, 1),
            "accuracy": total_correct / max(seen, 1),
            "examples": seen,
            "seconds": seconds,
            "images_per_s": seen / seconds if seconds else 0.0,
        }

    def predict(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        out = [
            self._predict_step(tf.constant(x[i : i + batch_size], tf.float32)).numpy()
            for i in range(0, len(x), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, len(CLASSES)), np.float32)


# ---------------------------------------------------------------- BatchNorm


def recalibrate_batchnorm(
    model: keras.Model, x: np.ndarray, max_images: int = 512, batch_size: int = 64
) -> None:
    """Replace BatchNorm moving statistics by their exact average over un-augmented images.

    Moving averages (momentum 0.9) follow the last few batches of a weight trajectory that
    keeps moving, so inference accuracy can swing between epochs (measured: 0.94 -> 0.64
    -> 0.99 validation accuracy for the compact CNN). Averaging batch statistics of the
    final weights over a fixed sample removes the lag. Runs eagerly because the momentum
    changes every batch (i/(i+1) gives the running mean of batch statistics).
    """
    layers = batchnorm_layers(model)
    if not layers or len(x) == 0:
        return
    saved = [la.momentum for la in layers]
    idx = np.random.default_rng(0).permutation(len(x))[:max_images]
    try:
        for i, start in enumerate(range(0, len(idx), batch_size)):
            for la in layers:
                la.momentum = i / (i + 1)
            model(tf.constant(x[idx[start : start + batch_size]], tf.float32), training=True)
    finally:
        for la, m in zip(layers, saved):
            la.momentum = m


# ---------------------------------------------------------------- classifier head

def head_features(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 64
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The inputs of the classifier head (``HEAD_LAYER``) for un-augmented images, in
    inference mode, with their labels. With the rotation ensemble each image gives four rows
    (its four turns, each of which the head scores before the mean), labels repeated."""
    extract = keras.Model(model.inputs, model.get_layer(HEAD_LAYER).input)
    starts = range(0, len(x), batch_size)
    out = [np.asarray(extract(tf.constant(x[i : i + batch_size], tf.float32), training=False))
           for i in starts]
    if not out:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    turns = len(out[0]) // min(batch_size, len(x))  # RotationStack: each batch's turns stacked
    labels = np.concatenate([np.tile(y[i : i + batch_size], turns) for i in starts])
    return np.concatenate(out), labels


# ---------------------------------------------------------------- loops


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_macro_f1: float = -1.0
    seconds: float = 0.0


def fit(
    trainer: Trainer,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None,
    epochs: int,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    patience: int = 8,
    class_balanced: bool = True,
    seed: int = 0,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    recalibrate_bn: bool = True,
    augmentation: str = DEFAULT_AUGMENTATION,
    logit_adjustment: bool = False,
) -> FitResult:
    """Centralized training: cosine schedule, early stopping on validation macro-F1,
    best weights restored at the end. With ``recalibrate_bn`` BatchNorm statistics are
    recomputed on training images before each validation, so the model that is validated
    (and kept) is the one that will be served. ``logit_adjustment`` trains on the class
    prior of ``train`` (the federated default's loss) instead of class weights."""
    x, y = train
    balanced = class_balanced and not logit_adjustment
    trainer.reset(class_weights=class_weights(y) if balanced else np.ones(len(CLASSES)),
                  log_prior=logit_prior(y) if logit_adjustment else None)
    ds = make_dataset(x, y, batch_size, training=True, seed=seed, augmentation=augmentation)
    steps = len(x) // batch_size if len(x) >= batch_size else 1
    result = FitResult()
    best_weights = trainer.model.get_weights()
    start = time.perf_counter()
    for epoch in range(epochs):
        trainer.learning_rate = cosine_lr(learning_rate, epoch, epochs)
        if progress:
            print(f"epoch {epoch + 1}/{epochs}", flush=True)
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": trainer.learning_rate}
        row.update({f"train_{k}": v for k, v in trainer.train_epoch(ds, steps, progress).items()})
        if recalibrate_bn:
            recalibrate_batchnorm(trainer.model, x)
        if val is not None and len(val[0]):
            m = classification_metrics(val[1], trainer.predict(val[0]))
            row.update(val_accuracy=m["accuracy"], val_macro_f1=m["macro_f1"])
            if m["macro_f1"] > result.best_val_macro_f1:
                result.best_val_macro_f1 = float(m["macro_f1"])  # type: ignore[arg-type]
                result.best_epoch = epoch + 1
                best_weights = trainer.model.get_weights()
        result.history.append(row)
        if progress:
            print("  " + "  ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"),
                  flush=True)
        if on_epoch:
            on_epoch(row)
        if val is not None and epoch + 1 - result.best_epoch >= patience:
            if progress:
                print(f"early stop: no better val macro-F1 for {patience} epochs", flush=True)
            break
    if val is not None and result.best_epoch:
        trainer.model.set_weights(best_weights)
    result.seconds = time.perf_counter() - start
    return result


def local_fit(
    trainer: Trainer,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int = 1,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    proximal_mu: float = 0.0,
    class_balanced: bool = True,
    seed: int = 0,
    recalibrate_bn: bool = True,
    augmentation: str = DEFAULT_AUGMENTATION,
    logit_adjustment: bool = False,
    pooled_class_weights: np.ndarray | None = None,
    pooled_class_counts: np.ndarray | None = None,
    stain_bank: np.ndarray | None = None,
) -> dict[str, float]:
    """One hospital's local training in a federated round, from the weights already set on
    trainer.model. Returns aggregate numbers only (nothing per image).

    ``logit_adjustment`` trains on the local class prior (``logit_prior``) instead of
    inverse-frequency weights: both aim at the class-balanced posterior, but weights
    computed from each hospital's own counts give every hospital a different objective
    (a hospital's two Benign images weigh 20 times one of its Pre-B images) and still push
    classes it lacks down, which averaging does not undo. ``pooled_class_weights`` (the
    inverse frequencies of the federation's pooled counts) replace the local ones: every
    hospital's loss is then its share of the centralized class-balanced loss.
    ``pooled_class_counts`` with ``logit_adjustment``: the prior is the federation's pooled
    one instead of this hospital's, so the hospitals' losses sum to the centralized
    logit-adjusted loss. ``stain_bank``: the federation's pooled stain targets for the
    augmentation (``leukofed.stain_bank``), so that this hospital's images are moved to
    the stains of classes and laboratories it does not hold."""
    ones = np.ones(len(CLASSES), np.float32)
    local_weights = class_weights(y) if pooled_class_weights is None else pooled_class_weights
    trainer.reset(
        learning_rate=learning_rate,
        proximal_mu=proximal_mu,
        class_weights=local_weights if class_balanced and not logit_adjustment else ones,
        log_prior=(None if not logit_adjustment else logit_prior(y)
                   if pooled_class_counts is None else pooled_log_prior(pooled_class_counts)),
    )
    ds = make_dataset(x, y, min(batch_size, len(x)), training=True, seed=seed,
                      augmentation=augmentation, stain_bank=stain_bank)
    stats: dict[str, float] = {}
    total = 0.0
    for _ in range(epochs):
        stats = trainer.train_epoch(ds)
        total += stats["seconds"]
    if recalibrate_bn:
        # The BatchNorm statistics this hospital sends then match its final weights.
        recalibrate_batchnorm(trainer.model, x)
    return {"loss": stats["loss"], "accuracy": stats["accuracy"],
            "num_examples": float(len(x)), "train_seconds": total}


def evaluate(trainer: Trainer, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    return classification_metrics(y, trainer.predict(x))


def run_central(
    data: str | Path,
    out: str | Path,
    model: str = "compact_cnn",
    image_size: int = DEFAULT_IMAGE_SIZE,
    alpha: float = 0.35,
    epochs: int = 30,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    patience: int = 8,
    weights: str | None = None,
    split_manifest: str | Path | None = None,
    seed: int = 0,
    jit_compile: bool = False,
    bn_momentum: float | None = 0.9,
    progress: bool = True,
    augmentation: str = DEFAULT_AUGMENTATION,
    cell_focus: bool = DEFAULT_CELL_FOCUS,
    rotation_ensemble: bool = DEFAULT_ROTATION_ENSEMBLE,
    coverage: float = 0.95,
) -> dict[str, Any]:
    """Split (by blocks), train, pick the best epoch on validation macro-F1, test once,
    and audit the test result against shortcuts (leukofed.audit).

    Writes OUT/model.keras (with metadata: classes, the acquisition profile of the training
    images for "refer", the class stain targets, the calibration and model card),
    OUT/metrics.json, OUT/confusion_matrix.png, OUT/card.md.
    """
    from leukofed.audit import audit_set_from_train, run_audit
    from leukofed.calibration import calibration_report, calibration_sums
    from leukofed.card import build_card, card_markdown
    from leukofed.data import fingerprint, scan_dataset
    from leukofed.metrics import plot_confusion_matrix
    from leukofed.models import build_model, model_metadata, save_model
    from leukofed.ood import AcquisitionProfile, ProfileStats
    from leukofed.splits import group_split, read_manifest
    from leukofed.stain import class_stain_targets

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = scan_dataset(data)
    split = read_manifest(split_manifest, data) if split_manifest else group_split(
        dataset.records, seed=seed)
    if not split.train:
        raise ValueError("the training split is empty: too few images or groups")
    arrays = {n: load_arrays(split[n], image_size) for n in ("train", "val", "test")}
    net = build_model(model, image_size, alpha=alpha, weights=weights, seed=seed,
                      bn_momentum=bn_momentum, cell_focus=cell_focus,
                      rotation_ensemble=rotation_ensemble)
    trainer = Trainer(net, learning_rate, jit_compile=jit_compile)
    result = fit(trainer, arrays["train"], arrays["val"], epochs, batch_size, learning_rate,
                 patience, seed=seed, progress=progress, augmentation=augmentation)
    test = evaluate(trainer, *arrays["test"])
    profile = AcquisitionProfile.from_stats(ProfileStats.of_images(arrays["train"][0]))
    referred = [v.refer for v in profile.judge_images(arrays["test"][0])]
    audit = run_audit(trainer.predict, audit_set_from_train(*arrays["train"], *arrays["test"],
                                                            len(CLASSES), seed))
    # Temperature and conformal thresholds from the validation split, measured on test:
    # what a served version answers (leukofed.calibration).
    # No validation images, no calibration: thresholds fitted on nothing would put every
    # class in every set.
    calibration = calibration_report(
        calibration_sums(trainer.predict(arrays["val"][0]), arrays["val"][1]), coverage,
        calibration_sums(trainer.predict(arrays["test"][0]), arrays["test"][1])
    ) if len(arrays["val"][1]) else None
    meta = model_metadata(net, model, image_size, {
        "alpha": alpha if model == "mobilenetv2" else None,
        "dataset_fingerprint": dataset.fingerprint,
        "train_fingerprint": fingerprint(split.train),
        "best_epoch": result.best_epoch,
        "cell_focus": cell_focus,
        "rotation_ensemble": rotation_ensemble,
        "augmentation": augmentation,
        "acquisition_profile": profile.to_dict(),
        "stain_targets": class_stain_targets(*arrays["train"], len(CLASSES)).tolist(),
        **({"calibration": calibration["calibration"]} if calibration else {}),
    })
    meta["card"] = build_card({
        "model_name": str(out / "model.keras"), "version": "centralized",
        "created": time.strftime("%Y-%m-%d"), "model": model, "image_size": image_size,
        "recipe": {"cell_focus": cell_focus, "augmentation": augmentation,
                   "rotation_ensemble": rotation_ensemble},
        "training": {"hospitals": {"centralized": {
            "num_examples": len(arrays["train"][1]), "fingerprint": fingerprint(split.train),
            "class_counts": dict(zip(CLASSES, np.bincount(arrays["train"][1],
                                                          minlength=len(CLASSES)).tolist()))}},
            "partition": "block split"},
        "test": {"source": "the block split's test images",
                 "confusion": test["confusion_matrix"]},
        "calibration": calibration, "audit": audit,
        "referred_share": float(np.mean(referred)) if referred else None,
        "acquisition_profile_images": profile.count})
    save_model(net, out / "model.keras", meta)
    plot_confusion_matrix(test["confusion_matrix"], CLASSES, out / "confusion_matrix.png",
                          f"{model} @{image_size}px, test split")
    report = {"model": meta, "history": result.history, "best_epoch": result.best_epoch,
              "train_seconds": result.seconds, "test": test, "audit": audit,
              "calibration": calibration,
              "test_referred_share": float(np.mean(referred)) if referred else 0.0,
              "counts": {n: len(split[n]) for n in ("train", "val", "test")}}
    (out / "metrics.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "card.md").write_text(card_markdown(meta["card"]))
    return report
