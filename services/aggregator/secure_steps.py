"""Fit and BatchNorm calibration under secure aggregation (services.aggregator.secure runs
the protocol): the aggregator learns weighted sums and their total weight, never one
hospital's vector. With central DP the noise goes onto the sum before anything reads it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leukofed.protocol import AnswerInvalid, FitReport, WireMap
from leukofed.strategies import ClientResult
from leukofed.transport import TASK_CALIBRATE, TASK_FIT
from leukofed.wire import encode_weights
from services.aggregator.config import RunConfig
from services.aggregator.deps import Weights
from services.aggregator.gather import Gather
from services.aggregator.privacy_step import dp_denominator, dp_summary
from services.aggregator.secure import SecureAborted, SecureGather
from services.aggregator.secure_checks import checked_count

__all__ = ["SecureAborted", "SecureFit", "secure_calibrate", "secure_fit"]


@dataclass
class SecureFit:
    accepted: list[ClientResult]  # one "secure-sum" result: the mean update
    answered: list[str]
    reports: dict[str, FitReport]  # what each answer says beside its masked vector
    failures: dict[str, str]
    privacy: dict[str, object] | None
    info: dict[str, object]  # the secure-aggregation summary of the round


def secure_fit(g: Gather, cfg: RunConfig, server_round: int, selected: list[str],
               blob: bytes, config: WireMap, weights: Weights, bn_names: frozenset[str],
               clip: float) -> SecureFit:
    """The aggregator gets the weighted sum of the deltas and the total weight, and builds
    the mean update from them. With central DP each hospital clipped its delta to ``clip``
    (weight 1) and the noise goes onto the sum. SecureAborted when the sum cannot complete."""
    from leukofed.secagg import VectorSpec
    from services.aggregator.secure import update_ranges

    assert cfg.secure_aggregation is not None
    floats = {n: w for n, w in weights.items() if np.issubdtype(w.dtype, np.floating)}
    dp = cfg.privacy is not None and cfg.privacy.central
    ranges = update_ranges(floats, bn_names, cfg.secure_aggregation.update_range)
    if dp:  # a clipped delta has no coordinate beyond the clip norm
        ranges = {n: min(r, clip) for n, r in ranges.items()}
    spec = VectorSpec(tuple(ranges), tuple(ranges.values()),
                      ("count", "unclipped") if dp else ("count",))
    extra = ({"dp_clip_norm": clip} if dp else
             {"update_clip_norm": cfg.secure_aggregation.update_clip_norm})
    result = SecureGather(g, cfg, server_round, "fit").gather(
        selected, TASK_FIT, blob, config, floats, spec, cfg.min_fit_clients, extra_secure=extra)
    # Nothing divides by the count before it is the survivors' declared weight.
    total = checked_count(result, spec, unit_weights=dp)
    info = result.summary
    # Per hospital only its declared count is known (its cap), never what it weighed.
    info["participants"] = dict(info["caps"])
    privacy = None
    if dp:
        from leukofed.privacy import noised_mean

        assert cfg.privacy is not None
        p = cfg.privacy
        res = noised_mean(weights, result.sums, result.extras["unclipped"], len(selected),
                          clip, p.noise_multiplier, np.random.default_rng(),
                          denominator=dp_denominator(cfg, selected, g.pool_size),
                          adaptive=p.adaptive_clipping, target_quantile=p.target_quantile,
                          clip_learning_rate=p.clip_learning_rate, count_noise=p.count_noise,
                          num_updates=len(result.answers))
        mean = res.weights
        privacy = dp_summary(cfg, clip, res)
    else:
        mean = {n: ((w.astype(np.float64) + result.sums[n] / total).astype(w.dtype)
                    if n in result.sums else w.copy()) for n, w in weights.items()}
    info["total_weight"] = total
    g.event(f"round {server_round}: secure sum of {sorted(result.answers)} "
            f"({info['protocol']}, {info['bits']}-bit, {info['neighbours']} neighbours; "
            f"dropped after sharing: {info['dropped_after_shares'] or 'none'})",
            round=server_round)
    reports = {}
    for h, answer in sorted(result.answers.items()):
        try:
            reports[h] = FitReport.decode(answer)
        except AnswerInvalid as exc:  # its vector counted; its other numbers are left out
            g.event(f"round {server_round}: the report beside {h}'s masked vector is left "
                    f"out ({exc})", round=server_round, hospital=h)
            reports[h] = FitReport(hospital=h)
    accepted = [ClientResult("secure-sum", mean, max(1, int(round(total))))]
    return SecureFit(accepted, sorted(result.answers), reports, result.failures, privacy, info)


def secure_calibrate(g: Gather, cfg: RunConfig, server_round: int, weights: Weights,
                     hospitals: list[str], current: Weights, start: float
                     ) -> tuple[Weights, dict[str, object]]:
    """BatchNorm calibration as a secure sum of first and second moments weighted by
    image counts: exact pooling, and no hospital's statistics seen on their own. An
    aborted sum keeps the averaged statistics, like a calibration nobody answered."""
    from leukofed.secagg import VectorSpec, bn_from_moments
    from services.aggregator.model_steps import task_config
    from services.aggregator.secure import moment_ranges

    clock = g.deps.clock
    ranges = moment_ranges(current)
    spec = VectorSpec(tuple(ranges), tuple(ranges.values()))
    config = task_config(cfg, g.run_id, server_round, clock() + cfg.round_deadline_s,
                         bn_mode="average", calibration_images=cfg.calibration_images)
    try:
        result = SecureGather(g, cfg, server_round, "calibrate").gather(
            hospitals, TASK_CALIBRATE, encode_weights(weights), config, current, spec, 2)
        count = checked_count(result, spec)
    except SecureAborted as exc:
        g.event(f"round {server_round}: {exc}; the averaged BatchNorm statistics stay",
                round=server_round)
        return weights, {"pooling": "secure", "aborted": str(exc), "seconds": clock() - start}
    pooled = bn_from_moments({n: v / count for n, v in result.sums.items()})
    out = dict(weights)
    out.update({n: pooled[n].astype(weights[n].dtype) for n in pooled})
    return out, {"hospitals": result.summary["caps"], "failed": result.failures,
                 "pooling": "secure", "secure_aggregation": result.summary,
                 "seconds": clock() - start}
