"""The steps that send the new global model back to the hospitals within a round: BatchNorm
calibration (their measured statistics replace the averaged ones), head rebalancing (their
per-class feature sums refit the classifier head) and federated evaluation.
Whoever answers by the deadline counts; no quorum."""

from __future__ import annotations

import numpy as np

from leukofed.head_rebalance import HEAD_WEIGHTS, FeatureStats, rebalanced_head
from leukofed.protocol import EvaluateAnswer, RoundConfig, WireAnswer, WireMap
from leukofed.strategies import pool_batchnorm_stats
from leukofed.transport import TASK_CALIBRATE, TASK_EVALUATE
from leukofed.validation import check_evaluations, check_tensor_answers, validate_batchnorm_stats
from leukofed.wire import encode_weights
from services.aggregator.config import RunConfig
from services.aggregator.deps import Weights
from services.aggregator.gather import Gather
from services.aggregator.round_logic import CalibrationSums, without_calibration

MEMBERSHIP_REFERENCE_ROUND = 1  # the calibrated membership attack's reference model


def task_config(cfg: RunConfig, run_id: str, server_round: int, deadline: float,
                **config: object) -> WireMap:
    """The round configuration of a calibrate or evaluate task (a fit's is rounds.fit_config)."""
    return RoundConfig.build(
        run_id=run_id, round=server_round, model=cfg.model, image_size=cfg.image_size,
        alpha=cfg.alpha, norm=cfg.norm, cell_focus=cfg.cell_focus,
        rotation_ensemble=cfg.rotation_ensemble, jit_compile=cfg.jit_compile,
        deadline=deadline, **config)


def _send(g: Gather, cfg: RunConfig, server_round: int, task: str, weights: Weights,
          hospitals: list[str], **config: object
          ) -> tuple[dict[str, WireAnswer], dict[str, str], bytes]:
    """(answers, failures, the weight blob sent, which signed answers name)."""
    deadline = g.deps.clock() + cfg.round_deadline_s
    config_map = task_config(cfg, g.run_id, server_round, deadline, **config)
    blob = encode_weights(weights)
    answers, failures = g.ask(server_round, task, hospitals, blob, config_map, deadline)
    return answers, failures, blob


def calibrate(g: Gather, cfg: RunConfig, server_round: int, weights: Weights,
              hospitals: list[str], bn_names: frozenset[str], robust: bool = False
              ) -> tuple[Weights, dict[str, object]]:
    """Replace the new global model's BatchNorm statistics by those the round's hospitals
    measure on it, pooled exactly or by median (leukofed.strategies.pool_batchnorm_stats).
    Statistics that fail a check are rejected with a logged reason; with none usable the
    averaged statistics stay and the round goes on."""
    start = g.deps.clock()
    current = {n: weights[n] for n in sorted(bn_names)}
    if cfg.secure_aggregation is not None:
        from services.aggregator.secure_steps import secure_calibrate

        return secure_calibrate(g, cfg, server_round, weights, hospitals, current, start)
    answers, failures, blob = _send(g, cfg, server_round, TASK_CALIBRATE, weights, hospitals,
                                    bn_mode="average",
                                    calibration_images=cfg.calibration_images)
    usable, rejected = check_tensor_answers(
        answers, lambda a, h: g.verify(a, h, server_round, "calibration", TASK_CALIBRATE, blob),
        g.declared,
        lambda measured: validate_batchnorm_stats(current, measured,
                                                  max_norm_ratio=cfg.max_norm_ratio),
        kind="calibration")
    used = {h: a.num_examples for h, (a, _) in usable.items()}
    stats = [measured for _, measured in usable.values()]
    for hospital, reason in rejected.items():
        g.event(f"round {server_round}: BatchNorm statistics from {hospital} rejected "
                f"({reason})", round=server_round, hospital=hospital,
                rejected=reason.split(":")[0])
    summary = {"hospitals": used, "rejected": rejected, "failed": failures,
               "pooling": "median" if robust else "exact", "seconds": g.deps.clock() - start}
    if not stats:
        g.event(f"round {server_round}: no usable BatchNorm statistics; the averaged ones "
                "stay", round=server_round)
        return weights, summary
    pooled = pool_batchnorm_stats(stats, [float(n) for n in used.values()], robust=robust)
    out = dict(weights)
    out.update({n: pooled[n].astype(weights[n].dtype) for n in pooled})
    return out, summary


def rebalance_head(g: Gather, cfg: RunConfig, server_round: int, weights: Weights,
                   hospitals: list[str]) -> tuple[Weights, dict[str, object]]:
    """Refit the new global model's classifier head on the per-class feature sums the
    round's hospitals measure on it (leukofed.head_rebalance). Sums that fail a check are
    rejected with a logged reason; with none usable the averaged head stays."""
    start = g.deps.clock()
    kernel = weights[HEAD_WEIGHTS[0]]
    classes, dim = int(kernel.shape[1]), int(kernel.shape[0])
    turns = 4 if cfg.rotation_ensemble else 1  # head_features: a row per rotation
    answers, failures, blob = _send(g, cfg, server_round, TASK_CALIBRATE, weights, hospitals,
                                    measure="head", calibration_images=cfg.calibration_images)
    # The sums are checked below, where the answer's image count is at hand.
    usable, rejected = check_tensor_answers(
        answers, lambda a, h: g.verify(a, h, server_round, "head statistics", TASK_CALIBRATE,
                                       blob),
        g.declared, lambda tensors: None, kind="calibration")
    stats: list[FeatureStats] = []
    for hospital, (answer, tensors) in usable.items():
        try:
            s = FeatureStats.from_arrays(
                {k.removeprefix("head/"): v for k, v in tensors.items()}, classes, dim)
        except (KeyError, ValueError) as exc:
            rejected[hospital] = f"schema: head statistics: {exc}"
            continue
        # No more rows than the images it says it measured (a rare class may be left out).
        if s.count.sum() > answer.num_examples * turns or (s.count % turns).any():
            rejected[hospital] = (f"count: {s.count.sum():.0f} feature rows for "
                                  f"{answer.num_examples} images")
            continue
        stats.append(s)
    for hospital, reason in rejected.items():
        g.event(f"round {server_round}: head statistics from {hospital} rejected ({reason})",
                round=server_round, hospital=hospital, rejected=reason.split(":")[0])
    out = weights
    if stats:
        out = {**weights, **rebalanced_head(weights, stats, seed=cfg.seed * 7919 + server_round)}
    else:
        g.event(f"round {server_round}: no usable head statistics; the averaged head stays",
                round=server_round)
    pooled = sum((s.count for s in stats), np.zeros(classes)) / turns
    return out, {"hospitals": sorted(h for h in usable if h not in rejected),
                 "rejected": rejected, "failed": failures,
                 "pooled_class_images": [int(c) for c in pooled],
                 "seconds": g.deps.clock() - start}


def evaluate(g: Gather, cfg: RunConfig, server_round: int, weights: Weights,
             hospitals: list[str], trained: set[str] | None = None, membership: bool = True
             ) -> tuple[dict[str, EvaluateAnswer], CalibrationSums]:
    """Evaluation answers that hold together (leukofed.validation.validate_evaluation);
    the others are logged with their reason and left out of every pooled number. Each
    answer's calibration sums are pooled as it arrives and dropped from what is kept (they
    are the bulk of an answer: ~90 KB, against a few hundred bytes of counts). Membership
    histograms are pooled only from ``trained`` (None: every hospital): a hospital the
    model never trained on has no members; ``membership`` False: not asked this round
    (services/aggregator/audit_plan.py)."""
    sums = CalibrationSums()
    if not hospitals:
        return {}, sums
    deadline = g.deps.clock() + cfg.round_deadline_s
    # The membership audit rides on evaluation (leukofed.membership): round 1's model is the
    # calibrated attack's reference, which each hospital keeps for its own images.
    config_map = task_config(cfg, g.run_id, server_round, deadline, bn_mode=cfg.bn_mode,
                             membership_images=cfg.membership_images if membership else 0,
                             membership_reference_round=MEMBERSHIP_REFERENCE_ROUND)
    blob = encode_weights(weights)
    valid: dict[str, EvaluateAnswer] = {}

    def take(hospital: str, answer: WireAnswer) -> WireAnswer:
        ok, rejected = check_evaluations(
            {hospital: answer}, lambda a, h: g.verify(a, h, server_round, "evaluation",
                                                      TASK_EVALUATE, blob), g.declared)
        for h, exc in rejected.items():
            g.event(f"round {server_round}: evaluation from {h} rejected "
                    f"({exc.reason}: {exc.message})", round=server_round,
                    hospital=h, rejected=exc.reason)
        if hospital in ok:
            answer = ok[hospital]
            if trained is not None and hospital not in trained and answer.membership:
                sums.membership_skipped[hospital] = ("membership histograms unusable: the "
                                                     "model has not trained on its images")
                answer = answer.model_copy(update={"membership": None})
            sums.add(hospital, answer, g.declared.get(hospital))
            valid[hospital] = without_calibration(ok[hospital])
        return {"status": "ok", "hospital": hospital}

    g.ask(server_round, TASK_EVALUATE, hospitals, blob, config_map, deadline, on_answer=take)
    return valid, sums
