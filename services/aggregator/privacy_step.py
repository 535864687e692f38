"""The privacy step of a round: the budget check before it, the clip norm it uses, and the
noised mean that replaces the individual updates under central differential privacy
(leukofed.privacy holds the mechanisms; this module applies them to a run)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from leukofed.protocol import FitReport
from leukofed.strategies import ClientResult
from services.aggregator.config import RunConfig
from services.aggregator.deps import Weights


class BudgetReached(Exception):
    """The next round would spend more privacy than the run's target epsilon."""


def poisson_sampling(cfg: RunConfig) -> bool:
    """Central DP with a sampled share of hospitals: each is taken with probability
    ``fraction``, independently, from OS entropy, as the accountant assumes."""
    return cfg.privacy is not None and cfg.privacy.central and cfg.fraction < 1


def dp_sampling_rate(cfg: RunConfig) -> float:
    """q for the accountant. Central: the share of hospitals sampled per round (amplification
    assumes the choice is random and not known to the attacker). Local: each hospital's
    release counts in full, so 1."""
    if cfg.privacy is None or not cfg.privacy.central:
        return 1.0
    return cfg.fraction


def dp_epsilon(cfg: RunConfig, rounds: int) -> float:
    from leukofed.privacy import epsilon

    assert cfg.privacy is not None
    return epsilon(cfg.privacy.noise_multiplier, rounds, cfg.privacy.delta,
                   dp_sampling_rate(cfg))


def check_budget(cfg: RunConfig, server_round: int,
                 rounds: Sequence[Mapping[str, Any]] = ()) -> None:
    """BudgetReached when ``server_round`` would take epsilon past the run's target; at the
    example level, when it would for any hospital (``rounds``: the run's round summaries,
    where each hospital's last report says what one more round would make its epsilon)."""
    p = cfg.privacy
    if p is None or p.target_epsilon is None:
        return
    if p.example:
        _check_example_budget(cfg, server_round, rounds)
        return
    after = dp_epsilon(cfg, server_round)
    if after > p.target_epsilon:
        spent = dp_epsilon(cfg, server_round - 1)
        raise BudgetReached(
            f"privacy budget reached after {server_round - 1} rounds: epsilon {spent:.3f} "
            f"at delta {p.delta:g}; round {server_round} would make it {after:.3f} > "
            f"target {p.target_epsilon:g}")


def _check_example_budget(cfg: RunConfig, server_round: int,
                          rounds: Sequence[Mapping[str, Any]]) -> None:
    assert cfg.privacy is not None and cfg.privacy.target_epsilon is not None
    last = example_state(rounds)
    over = {h: nxt for h, (_, nxt) in last.items() if nxt > cfg.privacy.target_epsilon}
    if over:
        h = max(over, key=lambda k: over[k])
        raise BudgetReached(
            f"privacy budget reached after {server_round - 1} rounds: hospital {h} has spent "
            f"epsilon {last[h][0]:.3f} at delta {cfg.privacy.delta:g} on its images; one more "
            f"round would make it {over[h]:.3f} > target {cfg.privacy.target_epsilon:g}")


def example_state(rounds: Sequence[Mapping[str, Any]]) -> dict[str, tuple[float, float]]:
    """Each hospital's last reported (run epsilon, epsilon after one more such round), over
    the run's round summaries: a hospital absent from a round keeps what it had spent."""
    out: dict[str, tuple[float, float]] = {}
    for summary in rounds:
        privacy = summary.get("privacy")
        if isinstance(privacy, Mapping) and privacy.get("level") == "example":
            for h, v in dict(privacy.get("hospitals", {})).items():
                out[h] = (float(v["epsilon"]), float(v["epsilon_next"]))
    return out


def missing_accounting(cfg: RunConfig, report: FitReport) -> str | None:
    """Why an example-level fit answer is refused: it does not say what it spent (a hospital
    that does not know the example level would have trained without DP-SGD)."""
    if cfg.privacy is None or not cfg.privacy.example:
        return None
    need = ("dp_epsilon", "dp_epsilon_next", "dp_noise_multiplier")
    missing = [k for k in need if k not in report.metrics]
    if missing:
        return (f"privacy: no example-level accounting in the answer ({', '.join(missing)} "
                "missing): the hospital may have trained without DP-SGD")
    return None


def example_summary(cfg: RunConfig, reports: Mapping[str, FitReport],
                    rounds: Sequence[Mapping[str, Any]]) -> dict[str, object]:
    """A round's example-level privacy summary: each hospital's spent run epsilon (this
    round's report, else its last one), and the largest of them as the run's epsilon."""
    p = cfg.privacy
    assert p is not None and p.example
    state = example_state(rounds)
    noise: dict[str, float] = {}
    for h, r in reports.items():
        if "dp_epsilon" in r.metrics:
            state[h] = (float(r.metrics["dp_epsilon"]), float(r.metrics["dp_epsilon_next"]))
            noise[h] = float(r.metrics["dp_noise_multiplier"])
    hospitals = {h: {"epsilon": e, "epsilon_next": n, **({"noise_multiplier": noise[h]}
                                                          if h in noise else {})}
                 for h, (e, n) in sorted(state.items())}
    return {"level": "example", "mode": "dp-sgd", "delta": p.delta,
            "target_epsilon": p.target_epsilon, "clip_norm": p.clip_norm,
            "noise_multiplier": p.noise_multiplier,  # 0: each hospital calibrated its own
            "sampling_rate": "per hospital (batch_size / its training images)",
            "hospitals": hospitals,
            "epsilon": max((v[0] for v in state.values()), default=0.0)}


def clip_norm(cfg: RunConfig, rounds: Sequence[dict[str, object]]) -> float:
    """The current clip norm: adaptive clipping carries it from round to round (in the
    round summaries, so a resumed run continues with it)."""
    assert cfg.privacy is not None
    for summary in reversed(rounds):
        privacy = summary.get("privacy")
        if isinstance(privacy, dict):
            return float(privacy["next_clip_norm"])
    return cfg.privacy.clip_norm


def dp_denominator(cfg: RunConfig, selected: list[str], pool_size: int) -> float:
    """Under Poisson sampling the expected sample size; otherwise the hospitals asked."""
    if poisson_sampling(cfg):
        return max(cfg.fraction * pool_size, 1e-9)
    return float(len(selected))


def dp_summary(cfg: RunConfig, clip: float, res: Any = None) -> dict[str, object]:
    """A round's privacy summary; ``res``: the noised step's result (central mode)."""
    assert cfg.privacy is not None
    p = cfg.privacy
    summary: dict[str, object] = {"mode": p.mode, "noise_multiplier": p.noise_multiplier,
                                  "delta": p.delta, "clip_norm": clip, "next_clip_norm": clip,
                                  "sampling_rate": dp_sampling_rate(cfg)}
    if res is not None:
        summary.update(next_clip_norm=res.next_clip_norm,
                       clipped_fraction=res.clipped_fraction)
    return summary


def privatize(cfg: RunConfig, weights: Weights, accepted: list[ClientResult],
              selected: list[str], rounds: Sequence[dict[str, object]], pool_size: int
              ) -> tuple[list[ClientResult], dict[str, object] | None]:
    """Central DP: the clipped, noised mean replaces the individual updates; the strategy
    then only post-processes it. Returns (results for the strategy, privacy summary)."""
    p = cfg.privacy
    if p is None or p.example:  # example level: the hospitals' optimizers did it
        return accepted, None
    clip = clip_norm(cfg, rounds)
    summary = dp_summary(cfg, clip)
    if p.mode == "central":
        from leukofed.privacy import central_mean

        # Noise from the OS entropy pool, never from the run seed: noise that can be
        # regenerated from a known seed can be subtracted, and the privacy is gone.
        res = central_mean(weights, [r.weights for r in accepted], len(selected), clip,
                           p.noise_multiplier, np.random.default_rng(),
                           denominator=dp_denominator(cfg, selected, pool_size),
                           adaptive=p.adaptive_clipping, target_quantile=p.target_quantile,
                           clip_learning_rate=p.clip_learning_rate,
                           count_noise=p.count_noise)
        summary = dp_summary(cfg, clip, res)
        accepted = [ClientResult("dp-mean", res.weights,
                                 sum(r.num_examples for r in accepted))]
    return accepted, summary
