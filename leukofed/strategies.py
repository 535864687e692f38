"""Aggregation strategies: how the aggregator turns hospitals' updates into the next model.

The maths are pure functions over arrays (``weighted_average``, ``coordinate_median``,
``trimmed_mean``, ``krum_scores``/``krum_select``, ``momentum_step``, ``adaptive_step``), so
unit tests check them against hand-computed numbers. The ``Strategy`` classes add the
bookkeeping: which tensors a rule applies to, the server optimizer's state (checkpointed by
the aggregator via ``state()`` and ``load_state()``, so a restarted aggregator continues with
the same momentum and moments), and the extra fit config sent to clients. Server optimizers
follow Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2.

Three kinds of tensor are treated differently, because averaging is not right for all:

* floating-point weights (kernels, biases, BatchNorm gamma/beta): the strategy's rule;
* BatchNorm moving statistics, named by ``bn_stat_names`` at construction (see
  ``leukofed.wire.batchnorm_stat_names``). With ``bn_mode="average"`` they are
  example-weighted averaged by every strategy: they are estimates of activation moments, not
  parameters descending a loss, so a server optimizer's momentum or a median has no meaning
  for them (and averaged statistics measured 0.844 vs 0.842 for recomputed ones, BRIEF 6).
  With ``bn_mode="local"`` (FedBN, Li et al. 2021) clients keep their own statistics
  (``set_model_weights(..., skip=bn names)``) and never load the global ones; the global
  model still gets the example-weighted average, because it is the model that is
  registered, evaluated at the server and served (left at their initial values, its
  statistics made it useless: measured 0.306 in BRIEF 6);
* non-float tensors (integer counters): copied from the first result, never averaged.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

Weights = dict[str, np.ndarray]
StateValue = np.ndarray | float | int
BN_MODES = ("average", "local")


@dataclass
class ClientResult:
    """One hospital's answer to a fit task."""

    hospital: str
    weights: Weights
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating)


def _check_same_names(updates: Sequence[Mapping[str, np.ndarray]]) -> list[str]:
    if not updates:
        raise ValueError("nothing to aggregate: no updates")
    names = list(updates[0])
    for i, update in enumerate(updates[1:], start=1):
        if set(update) != set(names):
            raise ValueError(f"update {i} has tensors {sorted(set(update) ^ set(names))[:5]} "
                             "that update 0 does not share")
    return names


def weighted_average(updates: Sequence[Mapping[str, np.ndarray]],
                     weights: Sequence[float]) -> Weights:
    """Weighted mean of each float tensor (computed in float64, returned in the first update's
    dtype). Integer tensors are taken from the first update: a rounded mean of counters is a
    value no client had."""
    names = _check_same_names(updates)
    if len(weights) != len(updates):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and sum > 0, got {list(weights)}")
    w = w / w.sum()
    out: Weights = {}
    for name in names:
        first = np.asarray(updates[0][name])
        if not _is_float(first):
            out[name] = first.copy()
            continue
        acc = np.zeros(first.shape, dtype=np.float64)
        for wi, update in zip(w, updates, strict=True):
            acc += wi * np.asarray(update[name], dtype=np.float64)
        out[name] = acc.astype(first.dtype)
    return out


class RunningSum:
    """The example-weighted mean of updates, folded in one at a time as they arrive.

    Holds one float64 copy of the model whatever the number of hospitals, so a round's
    memory does not grow with them. ``mean()`` equals ``weighted_average`` of the same
    updates (up to float64 rounding; both return float64 for float tensors here). Integer
    tensors are taken from the first update, as ``weighted_average`` does."""

    def __init__(self) -> None:
        self.sums: Weights = {}
        self.first: Weights = {}  # non-float tensors of the first update
        self.total = 0.0
        self.count = 0

    def add(self, update: Mapping[str, np.ndarray], num_examples: float) -> None:
        n = float(num_examples)
        if not np.isfinite(n) or n < 0:
            raise ValueError(f"num_examples must be finite and >= 0, got {num_examples!r}")
        if self.count and set(update) != set(self.sums) | set(self.first):
            raise ValueError("update has tensors the earlier updates do not share")
        for name, value in update.items():
            array = np.asarray(value)
            if not _is_float(array):
                self.first.setdefault(name, array.copy())
            elif name in self.sums:
                self.sums[name] += n * array.astype(np.float64)
            else:
                self.sums[name] = n * array.astype(np.float64)
        self.total += n
        self.count += 1

    def mean(self) -> Weights:
        if not self.count or self.total <= 0:
            raise ValueError("nothing to aggregate: no update with examples")
        return {**{n: s / self.total for n, s in self.sums.items()}, **self.first}


def pool_batchnorm_stats(stats: Sequence[Mapping[str, np.ndarray]],
                         counts: Sequence[float], robust: bool = False) -> Weights:
    """Pooled BatchNorm statistics of several hospitals, as if measured on their union.

    Means are example-weighted; a ``.../moving_variance`` whose ``.../moving_mean`` is also
    given is pooled exactly, including the spread *between* the hospitals' means:
    var = sum_i n_i (var_i + mean_i^2) / N - mean^2. Any other tensor is example-weighted.
    ``robust``: the coordinate-wise median of each tensor instead, unweighted, for the robust
    strategies (one hospital's statistics, or its claimed count, cannot move it).
    """
    names = _check_same_names(stats)
    if robust:
        if len(counts) != len(stats):
            raise ValueError(f"{len(stats)} statistics but {len(counts)} counts")
        return {n: coordinate_median([s[n] for s in stats]).astype(
            np.asarray(stats[0][n]).dtype) for n in names}
    w = weighted_average([{n: np.asarray(s[n], np.float64) for n in names} for s in stats],
                         counts)  # float64, validated weights
    total = float(sum(counts))
    out: Weights = {}
    for name in names:
        mean_name = name[: -len("moving_variance")] + "moving_mean" \
            if name.endswith("moving_variance") else None
        if mean_name is not None and mean_name in w:
            second = sum(float(n) * (np.asarray(s[name], np.float64)
                                     + np.asarray(s[mean_name], np.float64) ** 2)
                         for s, n in zip(stats, counts, strict=True)) / total
            value = np.maximum(second - w[mean_name] ** 2, 0.0)
        else:
            value = w[name]
        out[name] = value.astype(np.asarray(stats[0][name]).dtype)
    return out


def coordinate_median(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Element-wise median (Yin et al. 2018): one wild client cannot drag it."""
    return np.median(np.stack([np.asarray(a, dtype=np.float64) for a in arrays]), axis=0)


def trimmed_mean(arrays: Sequence[np.ndarray], beta: float) -> np.ndarray:
    """Element-wise mean after dropping the int(beta * n) smallest and largest values."""
    stacked = np.sort(np.stack([np.asarray(a, dtype=np.float64) for a in arrays]), axis=0)
    cut = int(beta * len(arrays))
    return stacked[cut: len(arrays) - cut].mean(axis=0)


def krum_scores(vectors: Sequence[np.ndarray], num_malicious: int) -> np.ndarray:
    """Krum score of each update (Blanchard et al. 2017): the sum of squared distances to its
    n - f - 2 nearest other updates (at least 1). An honest update sits among other honest
    ones, so its score is small; a poisoned one is far from everyone."""
    n = len(vectors)
    if n == 0:
        raise ValueError("nothing to score: no updates")
    if n == 1:
        return np.zeros(1)
    x = np.stack([np.asarray(v, dtype=np.float64).ravel() for v in vectors])
    sq = np.einsum("ij,ij->i", x, x)
    # ||a-b||^2 = |a|^2 + |b|^2 - 2ab; clipped at 0 against rounding
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    k = min(n - 1, max(1, n - num_malicious - 2))
    np.fill_diagonal(d2, np.inf)
    return np.sort(d2, axis=1)[:, :k].sum(axis=1)


def krum_select(vectors: Sequence[np.ndarray], num_malicious: int, num_selected: int
                ) -> list[int]:
    """Indices of the ``num_selected`` lowest Krum scores (ties: lower index first).
    num_selected=1 is Krum, more is multi-Krum (El Mhamdi et al. 2018)."""
    scores = krum_scores(vectors, num_malicious)
    order = np.argsort(scores, kind="stable")
    return sorted(int(i) for i in order[:max(1, min(num_selected, len(vectors)))])


def momentum_step(x: np.ndarray, delta: np.ndarray, m: np.ndarray, server_lr: float,
                  momentum: float) -> tuple[np.ndarray, np.ndarray]:
    """FedAvgM (Hsu et al. 2019): m = momentum * m + delta; x = x + server_lr * m."""
    m = momentum * m + delta
    return x + server_lr * m, m


def adaptive_step(variant: str, x: np.ndarray, delta: np.ndarray, m: np.ndarray, v: np.ndarray,
                  eta: float, beta_1: float, beta_2: float, tau: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One server step of FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021, Algorithm 2),
    ``delta`` being the averaged client model minus the global model. No bias correction, as
    in the paper; returns the new (x, m, v)."""
    m = beta_1 * m + (1.0 - beta_1) * delta
    d2 = delta * delta
    if variant == "adagrad":
        v = v + d2
    elif variant == "adam":
        v = beta_2 * v + (1.0 - beta_2) * d2
    elif variant == "yogi":
        v = v - (1.0 - beta_2) * d2 * np.sign(v - d2)
    else:
        raise ValueError(f"unknown adaptive variant {variant!r}")
    return x + eta * m / (np.sqrt(v) + tau), m, v


LR_SCHEDULES = ("constant", "cosine")


def cosine_lr(base: float, epoch: int, epochs: int, warmup: int = 1) -> float:
    """The learning rate of 0-based ``epoch`` of ``epochs``: ``warmup`` epochs rising to
    ``base``, then a cosine decay to near zero. Centralized training steps it per epoch
    (leukofed.train.fit), a federation per round (``round_learning_rate``)."""
    if epoch < warmup:
        return base * (epoch + 1) / (warmup + 1)
    progress = (epoch - warmup) / max(1, epochs - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def round_learning_rate(base: float, schedule: str, server_round: int, rounds: int) -> float:
    """The hospitals' local learning rate in round ``server_round`` (1-based) of ``rounds``.

    "cosine" is the centralized recipe's schedule with rounds for epochs: one warm-up
    round at half the rate, then a cosine decay to near zero by the last round. Without
    it the last round's hospitals still take full-size steps in their own directions and
    the served model is wherever the last average of those lands; with it the federation
    ends, as centralized training does, with small steps that average to a settled model.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose from "
                         f"{LR_SCHEDULES}")
    if schedule == "constant" or rounds <= 1:
        return float(base)
    return float(cosine_lr(base, min(max(server_round, 1), rounds) - 1, rounds))


def _number(name: str, value: Any, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False) -> float:
    """A real number within bounds, or a ValueError an API client can read."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return float(value)


class Strategy(ABC):
    """Turns one round's client results into the next global weights.

    ``bn_stat_names`` is given at construction (the aggregator knows its model before the
    first round) so that ``aggregate`` keeps Flower's signature."""

    name: ClassVar[str]

    # True where the new global weights are the clients' weighted average (FedAvg, FedProx),
    # so averaged BatchNorm statistics describe them. Every other rule (server optimizers,
    # median, Krum...) moves the weights elsewhere, and the averaged statistics then belong
    # to weights nobody has: the aggregator recalibrates them ("bn_calibration", measured
    # FedAdam 0.44 -> 0.98 test accuracy after central recalibration of its final model).
    weights_are_client_average: ClassVar[bool] = False
    # Robust rules take the median of calibrated statistics too (pool_batchnorm_stats).
    robust: ClassVar[bool] = False
    # True where the rule needs only the example-weighted mean of the updates (FedAvg,
    # FedProx, the server optimizers): the aggregator then folds each update into a
    # RunningSum as it arrives and aggregates the one mean, in memory bounded by one model.
    # The others (median, trimmed mean, Krum) need every update at once.
    streams: ClassVar[bool] = False

    def __init__(self, *, bn_mode: str = "average", bn_stat_names: Iterable[str] = ()) -> None:
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        if isinstance(bn_stat_names, str) or not all(isinstance(n, str) for n in bn_stat_names):
            raise ValueError("bn_stat_names must be a collection of tensor names")
        self.bn_mode = bn_mode
        self.bn_stat_names = frozenset(bn_stat_names)
        self.params: dict[str, Any] = {"bn_mode": bn_mode}

    def configure_fit(self, server_round: int) -> dict[str, Any]:
        """Extra config for the clients' fit task this round."""
        return {}

    def state(self) -> dict[str, StateValue]:
        """Server optimizer state to checkpoint; empty for stateless strategies."""
        return {}

    def load_state(self, state: Mapping[str, StateValue]) -> None:
        """Restore what ``state()`` returned (after an aggregator restart)."""
        if state:
            raise ValueError(f"{self.name} keeps no state, got keys {sorted(state)[:5]}")

    def aggregate(self, global_weights: Mapping[str, np.ndarray],
                  results: Sequence[ClientResult], server_round: int) -> Weights:
        """Next global weights, in ``global_weights``' order and dtypes. Results with no
        examples carry no information and are ignored."""
        for r in results:
            n = r.num_examples
            if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
                raise ValueError(f"{r.hospital}: num_examples must be an int >= 0, got {n!r}")
        results = [r for r in results if r.num_examples > 0]
        if not results:
            raise ValueError("nothing to aggregate: no result with examples")
        for r in results:
            if set(r.weights) != set(global_weights):
                diff = sorted(set(r.weights) ^ set(global_weights))
                raise ValueError(f"{r.hospital}: tensor names differ from the global model: "
                                 f"{diff[:5]}")
        unknown = self.bn_stat_names - set(global_weights)
        if unknown:
            raise ValueError(f"bn_stat_names not in the model: {sorted(unknown)[:5]}")
        counts = [float(r.num_examples) for r in results]
        floats = [n for n, g in global_weights.items()
                  if _is_float(np.asarray(g)) and n not in self.bn_stat_names]
        combined = self._combine({n: np.asarray(global_weights[n], np.float64) for n in floats},
                                 [{n: r.weights[n] for n in floats} for r in results], counts)
        bn = [n for n in global_weights if n in self.bn_stat_names]
        # Averaged in both modes: with "local" only the clients ignore them (see above).
        bn_avg = weighted_average([{n: r.weights[n] for n in bn} for r in results], counts) \
            if bn else {}
        out: Weights = {}
        for name, value in global_weights.items():
            g = np.asarray(value)
            if name in combined:
                new = combined[name]
            elif name in bn_avg:
                new = bn_avg[name]
            else:  # non-float
                new = results[0].weights[name]
            out[name] = np.array(new, dtype=g.dtype)  # always a fresh array
        return out

    @abstractmethod
    def _combine(self, global_weights: Weights, updates: list[dict[str, np.ndarray]],
                 num_examples: list[float]) -> Weights:
        """The rule for float weights; ``global_weights`` are float64 copies."""


class FedAvg(Strategy):
    """Example-weighted average (McMahan et al. 2017)."""

    name = "fedavg"
    weights_are_client_average = True
    streams = True

    def _combine(self, global_weights: Weights, updates: list[dict[str, np.ndarray]],
                 num_examples: list[float]) -> Weights:
        if not global_weights:
            return {}
        return weighted_average(updates, num_examples)


class FedProx(FedAvg):
    """FedAvg on the server; clients add (mu / 2) * ||w - w_global||^2 to their loss, which
    keeps non-IID hospitals from drifting far in many local steps (Li et al. 2020)."""

    name = "fedprox"

    def __init__(self, *, mu: float = 0.01, **common: Any) -> None:
        super().__init__(**common)
        self.mu = _number("mu", mu, low=0.0)
        self.params["mu"] = self.mu

    def configure_fit(self, server_round: int) -> dict[str, Any]:
        return {"proximal_mu": self.mu}


class _Stateful(Strategy):
    """Keeps per-tensor float64 state arrays under "<slot>/<tensor name>" plus scalars."""

    slots: ClassVar[tuple[str, ...]] = ()
    streams = True  # a step on the weighted mean delta

    def __init__(self, **common: Any) -> None:
        super().__init__(**common)
        self._arrays: dict[str, dict[str, np.ndarray]] = {s: {} for s in self.slots}
        self.t = 0  # server steps taken

    def state(self) -> dict[str, StateValue]:
        out: dict[str, StateValue] = {"t": self.t}
        for slot, arrays in self._arrays.items():
            out.update({f"{slot}/{n}": a.copy() for n, a in arrays.items()})
        return out

    def load_state(self, state: Mapping[str, StateValue]) -> None:
        arrays: dict[str, dict[str, np.ndarray]] = {s: {} for s in self.slots}
        t = 0
        for key, value in state.items():
            if key == "t":
                t = int(np.asarray(value))
                continue
            slot, _, name = key.partition("/")
            if slot not in arrays or not name:
                raise ValueError(f"{self.name}: unexpected state key {key!r}")
            arrays[slot][name] = np.array(value, dtype=np.float64)
        self._arrays, self.t = arrays, t

    def _slot(self, slot: str, name: str, like: np.ndarray, init: float) -> np.ndarray:
        have = self._arrays[slot].get(name)
        if have is None:
            if self.t:
                raise ValueError(f"{self.name}: no {slot} state for {name!r}; state from "
                                 "another model?")
            return np.full(like.shape, init)
        if have.shape != like.shape:
            raise ValueError(f"{self.name}: {slot} state for {name!r} has shape {have.shape}, "
                             f"tensor has {like.shape}")
        return have

    def _combine(self, global_weights: Weights, updates: list[dict[str, np.ndarray]],
                 num_examples: list[float]) -> Weights:
        """A server optimizer step on the example-weighted average delta, tensor by tensor;
        the state is committed only after every tensor succeeded."""
        if not global_weights:
            return {}
        avg = weighted_average([{n: np.asarray(u[n], np.float64) for n in u} for u in updates],
                               num_examples)
        out: Weights = {}
        new_state: dict[str, dict[str, np.ndarray]] = {slot: {} for slot in self.slots}
        for name, x in global_weights.items():
            out[name], values = self._step(name, x, avg[name] - x)
            for slot, value in zip(self.slots, values, strict=True):
                new_state[slot][name] = value
        for slot, arrays in new_state.items():
            self._arrays[slot].update(arrays)
        self.t += 1
        return out

    @abstractmethod
    def _step(self, name: str, x: np.ndarray, delta: np.ndarray
              ) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """(new value of tensor ``name``, its new state, one array per slot)."""


class FedAvgM(_Stateful):
    """FedAvg with server momentum (Hsu et al. 2019): smooths the round-to-round swings that
    non-IID hospitals cause. server_lr=1, momentum=0 is plain FedAvg."""

    name = "fedavgm"
    slots = ("momentum",)

    def __init__(self, *, server_lr: float = 1.0, momentum: float = 0.9, **common: Any) -> None:
        super().__init__(**common)
        self.server_lr = _number("server_lr", server_lr, low=0.0, low_open=True)
        self.momentum = _number("momentum", momentum, low=0.0, high=1.0, high_open=True)
        self.params.update(server_lr=self.server_lr, momentum=self.momentum)

    def _step(self, name: str, x: np.ndarray, delta: np.ndarray
              ) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        new, m = momentum_step(x, delta, self._slot("momentum", name, x, 0.0), self.server_lr,
                               self.momentum)
        return new, (m,)


class _FedOpt(_Stateful):
    """Reddi et al. 2021, Algorithm 2. v starts at tau**2 (the paper's v_{-1} >= tau^2), m at
    0. ``eta_l`` (client learning rate) is accepted for API familiarity but unused: the run's
    learning_rate goes to clients in the fit config."""

    variant: ClassVar[str]
    slots = ("m", "v")

    def __init__(self, *, eta: float = 1e-2, eta_l: float | None = None, beta_1: float = 0.9,
                 beta_2: float = 0.99, tau: float = 1e-3, **common: Any) -> None:
        super().__init__(**common)
        self.eta = _number("eta", eta, low=0.0, low_open=True)
        self.eta_l = None if eta_l is None else _number("eta_l", eta_l, low=0.0, low_open=True)
        self.beta_1 = _number("beta_1", beta_1, low=0.0, high=1.0, high_open=True)
        self.beta_2 = _number("beta_2", beta_2, low=0.0, high=1.0, high_open=True)
        self.tau = _number("tau", tau, low=0.0, low_open=True)
        self.params.update(eta=self.eta, beta_1=self.beta_1, beta_2=self.beta_2, tau=self.tau)

    def _step(self, name: str, x: np.ndarray, delta: np.ndarray
              ) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        new, m, v = adaptive_step(self.variant, x, delta, self._slot("m", name, x, 0.0),
                                  self._slot("v", name, x, self.tau**2), self.eta, self.beta_1,
                                  self.beta_2, self.tau)
        return new, (m, v)


class FedAdagrad(_FedOpt):
    """v accumulates every squared step: the server step size only shrinks."""

    name, variant = "fedadagrad", "adagrad"

    def __init__(self, *, eta: float = 1e-1, **kwargs: Any) -> None:
        super().__init__(eta=eta, **kwargs)  # the paper's best eta for FedAdagrad is 10x Adam's


class FedAdam(_FedOpt):
    """v is an exponential average of squared steps."""

    name, variant = "fedadam", "adam"


class FedYogi(_FedOpt):
    """Like Adam, but v moves additively towards delta^2, so it forgets large past steps more
    slowly and grows less abruptly: more stable with heterogeneous clients."""

    name, variant = "fedyogi", "yogi"


class FedMedian(Strategy):
    """Coordinate-wise median, unweighted (a hospital cannot buy influence with a large
    claimed example count)."""

    name = "fedmedian"
    robust = True

    def _combine(self, global_weights: Weights, updates: list[dict[str, np.ndarray]],
                 num_examples: list[float]) -> Weights:
        return {n: coordinate_median([u[n] for u in updates]) for n in global_weights}


class FedTrimmedAvg(Strategy):
    """Coordinate-wise mean without the int(beta * n) lowest and highest values (unweighted).
    With fewer than 1/beta clients nothing is trimmed."""

    name = "fedtrimmedavg"
    robust = True

    def __init__(self, *, beta: float = 0.2, **common: Any) -> None:
        super().__init__(**common)
        self.beta = _number("beta", beta, low=0.0, high=0.5, high_open=True)
        self.params["beta"] = self.beta

    def _combine(self, global_weights: Weights, updates: list[dict[str, np.ndarray]],
                 num_examples: list[float]) -> Weights:
        return {n: trimmed_mean([u[n] for u in updates], self.beta) for n in global_weights}


class MultiKrum(Strategy):
    """Multi-Krum: scores every update on all float tensors at once (one point per hospital
    in weight space), keeps the ``num_selected`` with the lowest scores and averages them,
    unweighted (as the median: a claimed example count must not buy influence).
    ``num_malicious`` is the number of attackers to tolerate, f; Krum's guarantee needs
    n > 2f + 2 updates. ``num_selected`` defaults to n - f."""

    name = "multikrum"
    robust = True

    def __init__(self, *, num_malicious: int = 1, num_selected: int | None = None,
                 **common: Any) -> None:
        super().__init__(**common)
        self.num_malicious = int(_number("num_malicious", num_malicious, low=0.0))
        self.num_selected = (None if num_selected is None
                             else int(_number("num_selected", num_selected, low=1.0)))
        self.params.update(num_malicious=self.num_malicious, num_selected=self.num_selected)
        self.last_selected: list[int] = []  # indices kept in the last round, for the log

    def _selected(self, n: int) -> int:
        if self.num_selected is not None:
            return self.num_selected
        return max(1, n - self.num_malicious)

    def _combine(self, global_weights: Weights, updates: list[dict[str, np.ndarray]],
                 num_examples: list[float]) -> Weights:
        if not global_weights:
            return {}
        names = list(global_weights)
        vectors = [np.concatenate([np.asarray(u[n], np.float64).ravel() for n in names])
                   for u in updates]
        keep = krum_select(vectors, self.num_malicious, self._selected(len(updates)))
        self.last_selected = keep
        return weighted_average([{n: np.asarray(updates[i][n], np.float64) for n in names}
                                 for i in keep], [1.0] * len(keep))


class Krum(MultiKrum):
    """Krum: the single update with the lowest score becomes the next model."""

    name = "krum"

    def __init__(self, *, num_malicious: int = 1, **common: Any) -> None:
        super().__init__(num_malicious=num_malicious, num_selected=1, **common)


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedMedian, FedTrimmedAvg,
                Krum, MultiKrum)
}


def strategy_params(cls: type[Strategy]) -> set[str]:
    """Keyword parameters a strategy accepts, its own and its base classes'."""
    accepted: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            accepted.update(p.name for p in inspect.signature(init).parameters.values()
                            if p.kind is inspect.Parameter.KEYWORD_ONLY)
    return accepted


def make_strategy(name: str, **params: Any) -> Strategy:
    """Build a strategy from a run config; any problem is a ValueError saying what to fix."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}")
    cls = STRATEGIES[key]
    unknown = set(params) - strategy_params(cls)
    if unknown:
        raise ValueError(f"{key} does not take {sorted(unknown)}; it takes "
                         f"{sorted(strategy_params(cls))}")
    return cls(**params)
