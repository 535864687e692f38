"""Example-level differential privacy in a hospital's local training (DP-SGD) and its
accounting.

What is protected: whether any one *training image* (with its label) of a hospital was used
(record-level DP; Abadi et al. 2016, "Deep Learning with Differential Privacy"). Each local
step

1. draws a Poisson sample of the hospital's training images: each image independently with
   probability ``q = batch_size / n`` (``poisson_batch``), so the batch size itself is
   random, as the accountant's amplification by sampling assumes;
2. computes every sampled image's own gradient (vectorised over the batch,
   ``tf.vectorized_map``) and clips it to L2 norm ``clip_norm`` C over all trainable
   weights together (``clip_factors``);
3. sums the clipped gradients, adds Gaussian noise N(0, (sigma C)^2) to every coordinate
   and divides by the *expected* batch size ``q n`` (a data-independent denominator:
   dividing by the realised size would need its own noise);
4. gives the result to the optimizer (Adam): post-processing, it keeps the guarantee. The
   FedProx term does not depend on the images, so its gradient is added after the noise.

Each step is a Poisson-sampled Gaussian mechanism with noise multiplier sigma and rate q;
a round is ``steps`` of them, and the rounds a hospital took part in compose
(``HospitalLedger`` accounts them with ``dp-accounting``'s RDP accountant, across every run
on the same images, so a hospital's total is what its data-protection officer asks about).

Why no maintained DP-SGD library: TensorFlow Privacy's optimizers wrap Keras 2 optimizers
(``tf_keras``) and its releases pin older TensorFlow; with TensorFlow 2.21 and Keras 3 its
``DPKerasAdamOptimizer`` does not apply. Opacus is PyTorch. The mechanism is a few lines;
the accountant, where mistakes hide, is the maintained library's.

BatchNorm mixes the images of a batch (each image's output depends on the others through
the batch statistics, and the moving statistics are exact averages of images): per-example
clipping then bounds nothing. Example-level DP therefore needs a model without it
(``build_model(..., norm="group")``); ``check_model`` refuses one with it, with the reason.

Unit of the guarantee: one image. A patient who gave k images is protected at the group
level: (k epsilon, k e^((k-1) epsilon) delta) by group privacy, a weak bound past k = 2 or 3.
A hospital that knows its patient ids can make the unit a patient instead by sampling
patients rather than images (each patient with probability q, all their images with them)
and clipping the *sum* of a patient's per-image gradients to C: the same accountant then
holds per patient (docs/security.md, "Example-level differential privacy").
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import weakref
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

LEDGER_NAME = "privacy_ledger.json"
# Integer RDP orders (the sampled Gaussian's RDP is exact there, as in leukofed.privacy):
# every one up to 64, where DP-SGD's epsilons of 1-20 find their best order, then sparser
# to 256 for small epsilons. The cost of one epsilon grows with the sum of the orders: this
# list is ~10x cheaper than all of 2..256, which noise calibration evaluates ~20 times.
ORDERS = [float(a) for a in range(2, 65)] + [80.0, 96.0, 128.0, 160.0, 192.0, 256.0]


class BatchMixingModel(ValueError):
    """The model mixes the images of a batch (BatchNorm): per-example clipping is void."""


class BudgetExceeded(Exception):
    """A task would take this hospital past an epsilon it accepts."""


# ---------------------------------------------------------------- the mechanism


@dataclass(frozen=True)
class DPSGDParams:
    """One hospital's DP-SGD for one round."""

    clip_norm: float  # C: bound of each image's gradient (L2, all trainable weights)
    noise_multiplier: float  # sigma: noise std / C
    sampling_rate: float  # q: each image's probability of being in a batch
    steps: int  # local steps this round (Poisson batches)

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ValueError("clip_norm must be positive")
        if self.noise_multiplier < 0:
            raise ValueError("noise_multiplier must be >= 0")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError("sampling_rate must be in (0, 1]")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")


def sampling_plan(n: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(q, steps) for ``epochs`` passes of expected batch ``batch_size`` over ``n`` images:
    q = batch_size / n (1 when n <= batch_size), steps = epochs * round(1 / q)."""
    if n < 1:
        raise ValueError("no training images")
    q = min(1.0, batch_size / n)
    return q, max(1, epochs * max(1, round(1.0 / q)))


def poisson_batch(n: int, q: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a Poisson sample: each of ``n`` images independently with probability q
    (sorted; possibly empty, as the mechanism requires)."""
    return np.flatnonzero(rng.random(n) < q)


def check_model(model: keras.Model) -> None:
    """BatchMixingModel when a layer normalises over the batch (BatchNorm)."""
    from leukofed.models import batchnorm_layers

    mixing = [la.name for la in batchnorm_layers(model)]
    if mixing:
        raise BatchMixingModel(
            f"example-level differential privacy needs a model without BatchNorm (it mixes "
            f"the images of a batch, so clipping one image's gradient bounds nothing, and its "
            f"moving statistics are exact averages of images): {len(mixing)} BatchNorm "
            f"layers, e.g. {mixing[0]!r}; use compact_cnn with norm 'group'")


def clip_factors(norms: tf.Tensor, clip_norm: float | tf.Tensor) -> tf.Tensor:
    """min(1, C / norm) per example: each clipped gradient has norm <= C."""
    return tf.minimum(1.0, clip_norm / tf.maximum(norms, 1e-12))


def clipped_sum(per_example: list[tf.Tensor], clip_norm: float | tf.Tensor
                ) -> tuple[list[tf.Tensor], tf.Tensor]:
    """(sum over the batch of each example's gradient clipped to ``clip_norm``, the norms
    before clipping). ``per_example``: one [B, ...] tensor per variable."""
    sq = tf.add_n([tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), axis=1)
                   for g in per_example])
    norms = tf.sqrt(sq)
    f = clip_factors(norms, clip_norm)
    return [tf.tensordot(f, g, axes=1) for g in per_example], norms


def noised_mean(summed: list[tf.Tensor], clip_norm: float | tf.Tensor,
                noise_multiplier: float | tf.Tensor, expected_batch: float | tf.Tensor,
                generator: tf.random.Generator) -> list[tf.Tensor]:
    """(sum + N(0, (sigma C)^2)) / expected batch size, per variable. ``generator``: one
    seeded from OS entropy (``tf.random.Generator.from_non_deterministic_state``), never
    from the run's seed: noise regenerated from a known seed can be subtracted."""
    std = tf.cast(noise_multiplier, tf.float32) * tf.cast(clip_norm, tf.float32)
    return [(s + generator.normal(tf.shape(s), stddev=std)) / tf.cast(expected_batch,
                                                                        tf.float32)
            for s in summed]


class DPStep:
    """A Trainer's DP-SGD step, compiled once per Trainer: the same model, optimizer, class
    weights / logit prior and FedProx anchor as its plain step (leukofed.train.Trainer)."""

    def __init__(self, trainer: Any) -> None:
        check_model(trainer.model)
        self.trainer = trainer
        self.clip_norm = tf.Variable(1.0, trainable=False, dtype=tf.float32)
        self.noise_multiplier = tf.Variable(0.0, trainable=False, dtype=tf.float32)
        self.expected_batch = tf.Variable(1.0, trainable=False, dtype=tf.float32)
        self.noise = tf.random.Generator.from_non_deterministic_state()
        # One trace for every batch size: a Poisson batch's size changes at every step, and
        # a trace per size cost seconds each (measured: 10 traces in 16 steps).
        image = tuple(trainer.model.input_shape[1:])
        self.per_example_grads = tf.function(self._per_example_grads, input_signature=[
            tf.TensorSpec((None, *image), tf.float32), tf.TensorSpec((None,), tf.int64)])
        self._apply = tf.function(self._apply_step)

    def _per_example_grads(self, x: tf.Tensor, y: tf.Tensor
                           ) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
        """(one [B, ...] gradient per trainable variable, per-example loss, correct flags)."""
        from leukofed.train import adjusted_cross_entropy

        t = self.trainer
        variables = t.model.trainable_variables

        # The example's own loss, weighted by its class weight (no normalisation by the
        # batch's total weight, as the plain step does: that would mix the examples).
        weights = tf.gather(t.class_weights, y)
        log_prior = tf.convert_to_tensor(t.log_prior)

        def one(args: tuple[tf.Tensor, tf.Tensor, tf.Tensor]) -> tuple[Any, ...]:
            xi, yi, wi = args
            xi, yi = xi[None], yi[None]
            with tf.GradientTape() as tape:
                probs = t.model(xi, training=True)
                loss = wi * adjusted_cross_entropy(probs, yi, log_prior)[0]
            grads = tape.gradient(loss, variables)
            grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
            correct = tf.cast(tf.argmax(probs, axis=1)[0] == yi[0], tf.float32)
            return (*grads, loss, correct)

        # Convolution filter gradients have no vectorised rule in TensorFlow: pfor runs
        # them in a loop over the batch (a warning at trace time), the rest vectorised.
        out = tf.vectorized_map(one, (x, y, weights))
        return list(out[:-2]), out[-2], out[-1]

    def _apply_step(self, summed: list[tf.Tensor]) -> None:
        t = self.trainer
        variables = t.model.trainable_variables
        grads = noised_mean(summed, self.clip_norm, self.noise_multiplier,
                            self.expected_batch, self.noise)
        # FedProx: mu (w - w_global) does not depend on the images, added after the noise.
        grads = [g + t.proximal_mu * (v - a) for g, v, a in zip(grads, variables, t.anchor)]
        t.optimizer.apply_gradients(zip(grads, variables))

    def step(self, x: tf.Tensor, y: tf.Tensor) -> tuple[float, float, int]:
        """One DP-SGD step on a Poisson batch (possibly empty). Returns (loss sum, correct,
        batch size) for the hospital's own metrics (before noise: they stay local unless
        reported as aggregate training metrics)."""
        variables = self.trainer.model.trainable_variables
        if int(y.shape[0]) == 0:
            summed = [tf.zeros_like(v) for v in variables]
            self._apply(summed)
            return 0.0, 0.0, 0
        grads, loss, correct = self.per_example_grads(x, y)
        summed, _ = clipped_sum(grads, self.clip_norm)
        self._apply(summed)
        return float(tf.reduce_sum(loss)), float(tf.reduce_sum(correct)), int(y.shape[0])


_STEPS: weakref.WeakKeyDictionary[Any, DPStep] = weakref.WeakKeyDictionary()


def dp_step_for(trainer: Any) -> DPStep:
    """The Trainer's DP step, built (and traced) once per Trainer."""
    step = _STEPS.get(trainer)
    if step is None:
        step = _STEPS[trainer] = DPStep(trainer)
    return step


def dp_local_fit(trainer: Any, x: np.ndarray, y: np.ndarray, params: DPSGDParams,
                 learning_rate: float = 1e-3, proximal_mu: float = 0.0,
                 class_balanced: bool = True, augmentation: str | None = None,
                 logit_adjustment: bool = False, rng: np.random.Generator | None = None
                 ) -> dict[str, float]:
    """One hospital's round under DP-SGD: ``params.steps`` Poisson batches, each image's
    gradient clipped, the sum noised. The counterpart of leukofed.train.local_fit, which
    stays as it is for runs without example-level DP. ``rng`` draws the batches: OS entropy
    by default (a known seed would tell an observer which images each step used)."""
    from leukofed.labels import CLASSES
    from leukofed.models import DEFAULT_AUGMENTATION
    from leukofed.train import (
        NO_STAIN_BANK,
        _augment_function,
        class_weights,
        logit_prior,
        stored_dtype,
    )

    step = dp_step_for(trainer)
    ones = np.ones(len(CLASSES), np.float32)
    trainer.reset(learning_rate=learning_rate, proximal_mu=proximal_mu,
                  class_weights=class_weights(y) if class_balanced and not logit_adjustment
                  else ones,
                  log_prior=logit_prior(y) if logit_adjustment else None)
    step.clip_norm.assign(params.clip_norm)
    step.noise_multiplier.assign(params.noise_multiplier)
    step.expected_batch.assign(max(params.sampling_rate * len(x), 1e-9))
    rng = rng or np.random.default_rng()
    stored = stored_dtype(x)
    augment = _augment_function(augmentation or DEFAULT_AUGMENTATION, stored)
    total_loss = correct = seen = 0.0
    start = time.perf_counter()
    for _ in range(params.steps):
        idx = poisson_batch(len(x), params.sampling_rate, rng)
        xb = tf.constant(x[idx], tf.as_dtype(stored))
        xb = augment(xb, NO_STAIN_BANK) if len(idx) else tf.cast(xb, tf.float32)
        loss, c, b = step.step(xb, tf.constant(y[idx], tf.int64))
        total_loss += loss
        correct += c
        seen += b
    seconds = time.perf_counter() - start
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1),
            "num_examples": float(len(x)), "train_seconds": seconds,
            "examples": seen, "steps": float(params.steps)}


# ---------------------------------------------------------------- accounting


def _event(noise_multiplier: float, sampling_rate: float, steps: int) -> Any:
    import dp_accounting

    event: Any = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    return dp_accounting.SelfComposedDpEvent(event, steps)


def epsilon_of(events: list[tuple[float, float, int]], delta: float) -> float:
    """epsilon at ``delta`` after the composition of (sigma, q, steps) events: RDP."""
    from dp_accounting.rdp import RdpAccountant

    events = [e for e in events if e[2] > 0]
    if not events:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in events):
        return math.inf
    accountant = RdpAccountant(ORDERS)
    for sigma, q, steps in events:
        accountant.compose(_event(sigma, q, steps))
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def calibrate_noise(target_epsilon: float, delta: float, sampling_rate: float,
                    steps: int) -> float:
    """The smallest noise multiplier whose ``steps`` Poisson-sampled Gaussian steps at rate
    q spend at most ``target_epsilon`` at ``delta`` (dp-accounting's calibration helper)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    if not target_epsilon > 0:
        raise ValueError("target_epsilon must be positive")
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: RdpAccountant(ORDERS),
        lambda sigma: _event(sigma, sampling_rate, steps),
        target_epsilon, delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(1e-2, 1e3),
        tol=1e-3))


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(epsilon, delta) for a group of ``k`` records (one patient's k images) from a
    per-record guarantee: (k eps, k e^((k-1) eps) delta) (Dwork and Roth 2014, Theorem 2.2
    and its (eps, delta) form; Vadhan 2017, Lemma 2.2). Loose past k = 2-3: a hospital that
    knows its patient ids does better by sampling patients and clipping each patient's
    summed gradient (the guarantee is then per patient, at the accountant's epsilon)."""
    if k < 1:
        raise ValueError("k must be >= 1")
    return k * epsilon, min(1.0, k * math.exp((k - 1) * epsilon) * delta)


@dataclass
class LedgerEntry:
    run: str
    round: int
    noise_multiplier: float
    sampling_rate: float
    steps: int
    clip_norm: float
    time: str = ""

    def event(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sampling_rate, self.steps)


class HospitalLedger:
    """What a hospital's training images have spent: every DP-SGD round it released, kept in
    its state folder (``privacy_ledger.json``, written atomically and fsynced before the
    update leaves), composed across all runs for its own limit and per run for the run's
    target. A lost ledger would forget spending: it lives beside the participation log."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / LEDGER_NAME

    def entries(self) -> list[LedgerEntry]:
        if not self.path.exists():
            return []
        data = json.loads(self.path.read_text(encoding="utf-8"))
        return [LedgerEntry(**e) for e in data.get("entries", [])]

    def record(self, entry: LedgerEntry) -> None:
        entries = self.entries()
        entry.time = entry.time or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        entries.append(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            json.dump({"format": "leukofed-privacy-ledger/1",
                       "entries": [asdict(e) for e in entries]}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)

    def epsilon(self, delta: float, run: str | None = None,
                extra: tuple[float, float, int] | None = None) -> float:
        """Spent epsilon at ``delta`` (one run's, or every run's when ``run`` is None),
        with ``extra`` (a round about to be trained) composed in when given."""
        events = [e.event() for e in self.entries() if run is None or e.run == run]
        return epsilon_of(events + ([extra] if extra else []), delta)

    def noise_for_run(self, run: str) -> float | None:
        """The noise multiplier this hospital calibrated for ``run`` (kept for the run)."""
        for e in self.entries():
            if e.run == run:
                return e.noise_multiplier
        return None


def summary_by_hospital(reports: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Each hospital's reported run epsilon (metric ``dp_epsilon``) from fit metrics."""
    return {h: float(m["dp_epsilon"]) for h, m in reports.items() if "dp_epsilon" in m}
