"""Client-level differential privacy for federated rounds (DP-FedAvg) and its accounting.

What is protected: whether any one *hospital* took part, and so everything about its images
(McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"). Each
hospital's update is the difference ``delta = local model - global model``; it is clipped to
L2 norm ``clip_norm`` (one hospital can move the sum by at most that much) and Gaussian noise
of standard deviation ``noise_multiplier * clip_norm`` is added to the sum. Then

    next = global + (sum_i clip(delta_i) + N(0, (z C)^2 I)) / n_selected

is a sampled Gaussian mechanism, and its privacy loss over rounds is tracked with Google's
``dp-accounting`` RDP accountant. Every float tensor is in the delta, BatchNorm moving
statistics included: they are computed from the images too, so averaging them outside the
mechanism would leak. The denominator is the number of hospitals *selected* (public, fixed
before any data is seen), not the number that answered: dividing by a data-dependent count
would need its own noise.

* ``central`` mode: hospitals send plain updates; the aggregator clips them and adds the
  noise. Protects against everyone who sees the *model* (MLflow, the
  registry, inference clients, other hospitals); the aggregator itself sees raw updates.
* ``local`` mode: each hospital clips and adds N(0, (z C)^2) to its own update before it
  leaves. Protects against the aggregator and the broker too, at the cost of n times the
  noise variance in the average. Accounted as a Gaussian mechanism per round a hospital
  takes part in, without amplification by sampling.
* adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
  Clipping"): the clip norm follows a target quantile of update norms, from a noised count
  of unclipped updates. That count costs privacy too; the paper's split is used: with count
  noise ``sigma_b`` the delta noise is ``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2`` so the
  two together are exactly the mechanism with ``noise_multiplier`` z that is accounted.

Strategies act after the mechanism, on the privatized mean (one result): post-processing,
so a server optimizer (FedAdam...) keeps the guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Weights = dict[str, np.ndarray]
MODES = ("central", "local")
# Integer RDP orders: the sampled Gaussian's RDP is exact there (no series that may fail to
# converge at fractional orders), and a reader can recompute it by hand (docs/security.md).
DEFAULT_ORDERS = [float(a) for a in range(2, 257)]


def _float_names(weights: Mapping[str, np.ndarray]) -> list[str]:
    return [n for n, v in weights.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def delta_norm(global_weights: Mapping[str, np.ndarray],
               update: Mapping[str, np.ndarray]) -> float:
    """L2 norm of update - global over every float tensor, in float64."""
    total = 0.0
    for n in _float_names(global_weights):
        d = np.asarray(update[n], np.float64) - np.asarray(global_weights[n], np.float64)
        total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


def clipped_delta(global_weights: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray],
                  clip_norm: float) -> tuple[Weights, float]:
    """(delta scaled to norm <= clip_norm, its norm before clipping); float tensors only."""
    norm = delta_norm(global_weights, update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {n: (np.asarray(update[n], np.float64) - np.asarray(global_weights[n], np.float64))
            * scale for n in _float_names(global_weights)}, norm


def gaussian_noise(like: Mapping[str, np.ndarray], std: float, rng: np.random.Generator
                   ) -> Weights:
    return {n: rng.normal(0.0, std, np.shape(v)) for n, v in like.items()}


def privatize_local(global_weights: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray],
                    clip_norm: float, noise_multiplier: float, rng: np.random.Generator
                    ) -> Weights:
    """A hospital's update under local DP: global + clip(delta) + N(0, (z C)^2)."""
    delta, _ = clipped_delta(global_weights, update, clip_norm)
    noise = gaussian_noise(delta, noise_multiplier * clip_norm, rng)
    out = dict(update)
    for n, d in delta.items():
        g = np.asarray(global_weights[n])
        out[n] = (g.astype(np.float64) + d + noise[n]).astype(np.asarray(update[n]).dtype)
    return out


def adaptive_split(noise_multiplier: float, count_noise: float) -> float:
    """Noise multiplier left for the deltas when the clipped count uses ``count_noise``
    (Andrew et al. 2021, Theorem 1): z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2."""
    rest = noise_multiplier ** -2 - (2.0 * count_noise) ** -2
    if rest <= 0:
        raise ValueError(f"count_noise {count_noise} too small for noise_multiplier "
                         f"{noise_multiplier}: need count_noise > noise_multiplier / 2")
    return rest ** -0.5


@dataclass
class CentralResult:
    weights: Weights  # the privatized mean model (float tensors; others from the first update)
    clipped_fraction: float  # share of updates whose norm exceeded the clip norm
    norms: list[float]
    next_clip_norm: float


def central_mean(global_weights: Mapping[str, np.ndarray],
                 updates: list[Mapping[str, np.ndarray]], num_selected: int, clip_norm: float,
                 noise_multiplier: float, rng: np.random.Generator, adaptive: bool = False,
                 target_quantile: float = 0.5, clip_learning_rate: float = 0.2,
                 count_noise: float | None = None, denominator: float | None = None
                 ) -> CentralResult:
    """The central DP-FedAvg step (module docstring), with optional adaptive clipping.
    ``denominator``: what the noised sum is divided by, default ``num_selected``; under
    Poisson sampling the *expected* sample size, since the realised one depends on whether
    each hospital was sampled, which the amplification by sampling keeps secret."""
    if not updates:
        raise ValueError("no updates")
    total: Weights = {}
    norms = []
    for u in updates:
        d, norm = clipped_delta(global_weights, u, clip_norm)
        norms.append(norm)
        for n, v in d.items():
            total[n] = total.get(n, 0.0) + v
    fallback = {n: np.asarray(updates[0][n]) for n in global_weights if n not in total}
    res = noised_mean({**global_weights, **fallback}, total,
                      sum(norm <= clip_norm for norm in norms), num_selected, clip_norm,
                      noise_multiplier, rng, adaptive=adaptive, target_quantile=target_quantile,
                      clip_learning_rate=clip_learning_rate, count_noise=count_noise,
                      num_updates=len(updates), denominator=denominator)
    return CentralResult(res.weights, res.clipped_fraction, norms, res.next_clip_norm)


def noised_mean(global_weights: Mapping[str, np.ndarray], total: Mapping[str, np.ndarray],
                unclipped: float, num_selected: int, clip_norm: float, noise_multiplier: float,
                rng: np.random.Generator, *, num_updates: int, adaptive: bool = False,
                target_quantile: float = 0.5, clip_learning_rate: float = 0.2,
                count_noise: float | None = None, denominator: float | None = None
                ) -> CentralResult:
    """The noised step from the *sum* of clipped deltas and the count of unclipped ones: what
    ``central_mean`` does after clipping, and all that secure aggregation lets the aggregator
    see (leukofed.secagg). Tensors not in ``total`` keep the value in ``global_weights``."""
    if num_updates < 1 or num_selected < num_updates:
        raise ValueError("num_selected must count every hospital asked, and one answered")
    divide_by = float(denominator) if denominator is not None else float(num_selected)
    if not divide_by > 0:
        raise ValueError("the denominator must be positive")
    z = noise_multiplier
    sigma_b = 0.0
    if adaptive:
        sigma_b = count_noise if count_noise is not None else num_selected / 20.0
        z = adaptive_split(noise_multiplier, sigma_b) if noise_multiplier > 0 else 0.0
    noise = gaussian_noise(total, z * clip_norm, rng)
    out: Weights = {}
    for n, g in global_weights.items():
        g = np.asarray(g)
        if n in total:
            out[n] = (g.astype(np.float64) + (total[n] + noise[n]) / divide_by).astype(g.dtype)
        else:
            out[n] = g.copy()
    next_clip = clip_norm
    if adaptive:
        # geometric update towards the target quantile, from a noised unclipped fraction
        noisy = (unclipped + (rng.normal(0.0, sigma_b) if noise_multiplier > 0 else 0.0)) \
            / divide_by
        next_clip = clip_norm * math.exp(-clip_learning_rate * (noisy - target_quantile))
    return CentralResult(out, 1.0 - unclipped / num_updates, [], next_clip)


# ---------------------------------------------------------------- accounting


def epsilon(noise_multiplier: float, rounds: int, delta: float, sampling_rate: float = 1.0,
            orders: list[float] | None = None) -> float:
    """(epsilon at delta) after ``rounds`` of the (Poisson-)sampled Gaussian mechanism,
    from dp-accounting's RDP accountant. 0 rounds is 0; no noise is infinity."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    event: Any = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    accountant = RdpAccountant(orders or DEFAULT_ORDERS)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


def rounds_within(noise_multiplier: float, target_epsilon: float, delta: float,
                  sampling_rate: float = 1.0, limit: int = 10_000) -> int:
    """How many rounds keep epsilon <= target (binary search; epsilon grows with rounds)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if epsilon(noise_multiplier, mid, delta, sampling_rate) <= target_epsilon:
            lo = mid
        else:
            hi = mid - 1
    return lo
