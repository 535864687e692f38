"""The round loop of one federated run.

A round is a recipe of steps, each in its own module:

  gather (gather.py: select, send fit, collect, drain late) -> answer checks
  (leukofed.validation) -> privacy (privacy_step.py) -> aggregate (leukofed.strategies) ->
  [BatchNorm calibration] -> [head rebalancing] -> federated evaluation (model_steps.py) ->
  summary
  (round_logic.py) -> checkpoint (run_records.py) -> track (MLflow, registry).

Secure aggregation replaces gather, checks and privacy with one secure sum
(secure_steps.py). ``FederatedRun`` keeps the lifecycle: resume, retries, cancel, failure.
I/O sits behind the interfaces of deps.py, so unit tests drive this loop with fakes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from leukofed.gate import GateFloors
from leukofed.head_rebalance import HEAD_WEIGHTS
from leukofed.protocol import FitReport, RoundConfig, RoundSummary, RunRecord, WireMap
from leukofed.strategies import ClientResult, Strategy, make_strategy, round_learning_rate
from leukofed.transport import TASK_FIT
from leukofed.validation import check_tensor_answers, validate_update
from leukofed.wire import encode_weights
from services.aggregator.audit_plan import audit_skipped
from services.aggregator.config import RunConfig
from services.aggregator.deps import (
    Dispatcher,
    ModelOps,
    RunDeps,
    Tracker,
    UpdateCheck,
    Weights,
)
from services.aggregator.gather import Gather
from services.aggregator.model_steps import (
    MEMBERSHIP_REFERENCE_ROUND,
    calibrate,
    evaluate,
    rebalance_head,
)
from services.aggregator.privacy_step import (
    BudgetReached,
    check_budget,
    clip_norm,
    dp_epsilon,
    example_summary,
    missing_accounting,
    poisson_sampling,
    privatize,
)
from services.aggregator.round_logic import (
    CalibrationSums,
    pool_round,
    round_summary,
    server_test_report,
)
from services.aggregator.secure_steps import SecureAborted, secure_fit
from services.aggregator.update_fold import UpdateFold, held_updates_problem

log = logging.getLogger(__name__)

__all__ = ["BudgetReached", "Dispatcher", "FederatedRun", "ModelOps", "RunCancelled",
           "RunDeps", "RunFailed", "RunInterrupted", "Tracker", "UpdateCheck", "fit_config"]


class RunFailed(Exception):
    """The run cannot go on; the message is the reason shown to the user."""


class RunCancelled(Exception):
    pass


class RunInterrupted(Exception):
    """The aggregator is shutting down: the run stays 'running' and resumes on restart."""


class RoundAborted(Exception):
    """This round cannot complete (secure sum aborted, Poisson sample too small); the run
    goes on with the next one."""


@dataclass
class FitRound:
    """What the fit step of a round brought back."""

    attempt: int
    selected: list[str]
    answered: list[str]  # every hospital whose fit answer arrived, accepted or not
    reports: dict[str, FitReport]  # the accepted ones'
    accepted: list[ClientResult]
    participants: dict[str, int]
    rejected: dict[str, str]
    failures: dict[str, str]
    wall_s: float
    privacy: dict[str, object] | None = None  # set under secure aggregation (noise on the sum)
    secure: dict[str, object] | None = None


def fit_config(cfg: RunConfig, record_id: str, server_round: int, strategy: Strategy,
               deadline: float) -> WireMap:
    """What a hospital needs to train this round (leukofed.protocol.RoundConfig)."""
    return RoundConfig.build(
        run_id=record_id, round=server_round, model=cfg.model, image_size=cfg.image_size,
        alpha=cfg.alpha, norm=cfg.norm, cell_focus=cfg.cell_focus,
        rotation_ensemble=cfg.rotation_ensemble, augmentation=cfg.augmentation,
        send_profile=cfg.privacy is None, local_epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        learning_rate=round_learning_rate(cfg.learning_rate, cfg.lr_schedule, server_round,
                                          cfg.rounds),
        class_balanced=cfg.class_balanced,
        logit_adjustment=cfg.class_balanced and cfg.logit_adjustment, bn_mode=cfg.bn_mode,
        fp16=cfg.fp16, seed=cfg.seed,
        jit_compile=cfg.jit_compile, deadline=deadline, **_local_dp(cfg),
        **strategy.configure_fit(server_round))


def _local_dp(cfg: RunConfig) -> dict[str, object]:
    p = cfg.privacy
    if p is not None and p.example:
        return {"dp_level": "example", "dp_clip_norm": p.clip_norm,
                "dp_noise_multiplier": p.noise_multiplier,
                "dp_target_epsilon": p.target_epsilon or 0.0, "dp_delta": p.delta,
                "dp_rounds": cfg.rounds}
    if p is None or p.mode != "local":
        return {}
    return {"dp_mode": "local", "dp_clip_norm": p.clip_norm,
            "dp_noise_multiplier": p.noise_multiplier}


class FederatedRun:
    def __init__(self, record: RunRecord, deps: RunDeps) -> None:
        self.record = record
        self.deps = deps
        self.store = deps.store
        self.cancel_requested = bool(record.get("cancel_requested"))
        self.stop_requested = False
        self.gather = Gather(deps, str(record["id"]), self.event, self._check)
        # The floors a version must reach to be audited (audit_plan): the aggregator's own.
        self.floors = GateFloors()

    def event(self, message: str, **fields: object) -> None:
        log.info("run %s: %s", self.record["id"], message)
        self.deps.store.event(self.record, message, **fields)
        self.deps.store.save(self.record)

    def _check(self) -> None:
        if self.cancel_requested:
            raise RunCancelled()
        if self.stop_requested:
            raise RunInterrupted()

    # ------------------------------------------------------------ the run

    def execute(self) -> RunRecord:
        rec, store, tracker = self.record, self.deps.store, self.deps.tracker
        cfg = RunConfig(**rec["config"])
        try:
            self._check()
            rec["status"], rec["reason"] = "running", None
            store.save(rec)
            weights, bn_names = self.deps.model_ops.initial(cfg)
            strategy = make_strategy(cfg.strategy, bn_mode=cfg.bn_mode,
                                     bn_stat_names=bn_names, **cfg.strategy_kwargs())
            rng = np.random.default_rng(cfg.seed)
            checkpoint = store.read_checkpoint(rec)
            if checkpoint is not None:
                weights, state = checkpoint
                strategy.load_state(state)
                rng.bit_generator.state = rec["rng_state"]
                self.event(f"resumed after round {rec['completed_round']}")
            if tracker is not None and rec.get("mlflow_run_id") is None:
                rec["mlflow_run_id"] = tracker.start(rec, cfg)
                store.save(rec)
            elif tracker is not None:
                tracker.start(rec, cfg)  # re-attach to the existing MLflow run
            if cfg.secure_aggregation is not None and not rec["completed_round"]:
                sa = cfg.secure_aggregation
                self.event(
                    f"secure aggregation on ({sa.bits}-bit, threshold {sa.threshold}, "
                    f"neighbours {sa.neighbours or 'automatic'}): this aggregator sees only "
                    "the weighted sum of the updates, never one hospital's; still per "
                    "hospital: public keys, declared size, fit metrics, class counts, "
                    "profile sums, evaluation answers (docs/security.md)")
            if rec["completed_round"] > rec["registered_round"] and rec["rounds"]:
                # Checkpointed but not tracked before a crash: track it now, exactly once.
                self._track(cfg, rec["rounds"][-1], weights)
            for server_round in range(rec["completed_round"] + 1, cfg.rounds + 1):
                self._check()
                check_budget(cfg, server_round, rec["rounds"])
                rec["current_round"] = server_round
                store.save(rec)
                weights = self._round(cfg, strategy, rng, server_round, weights)
            rec["status"] = "completed"
            self.event(f"completed {cfg.rounds} rounds")
        except BudgetReached as exc:
            rec["status"], rec["reason"] = "completed", str(exc)
            self.event(f"stopped: {exc}")
        except RunCancelled:
            rec["status"], rec["reason"] = "cancelled", "cancelled by request"
            self.event("cancelled")
        except RunInterrupted:
            self.event("interrupted by aggregator shutdown; resumes on restart")
            return rec
        except RunFailed as exc:
            rec["status"], rec["reason"] = "failed", str(exc)
            self.event(f"failed: {exc}")
        except Exception as exc:  # a bug or a broken dependency: fail loudly, keep the reason
            log.exception("run %s crashed", rec["id"])
            rec["status"], rec["reason"] = "failed", f"internal error: {type(exc).__name__}: {exc}"
            self.event(f"failed: {rec['reason']}")
        self._finish()
        return rec

    def _finish(self) -> None:
        self.gather.discard_late()
        self.deps.store.save(self.record)
        if self.deps.tracker is not None:
            try:
                self.deps.tracker.finish(self.record)
            except Exception:  # tracking must not turn a finished run into a crash
                log.exception("could not close the MLflow run")

    # ------------------------------------------------------------ one round

    def _round(self, cfg: RunConfig, strategy: Strategy, rng: np.random.Generator,
               server_round: int, weights: Weights) -> Weights:
        clock = self.deps.clock
        started = clock()
        try:
            fit = self._fit(cfg, strategy, rng, server_round, weights)
        except RoundAborted as exc:
            return self._abort_round(cfg, server_round, weights, strategy, rng, str(exc))
        private, privacy = fit.accepted, fit.privacy
        if fit.secure is None:  # under secure aggregation the noise went onto the sum
            private, privacy = privatize(cfg, weights, fit.accepted, fit.selected,
                                         self.record["rounds"], self.gather.pool_size)
        new_weights = strategy.aggregate(weights, private, server_round)
        bn_calibration = None
        if cfg.calibrates_batchnorm() and strategy.bn_stat_names:
            new_weights, bn_calibration = calibrate(
                self.gather, cfg, server_round, new_weights, sorted(fit.participants),
                strategy.bn_stat_names, robust=strategy.robust)
        head = None
        # After calibration: the features under the statistics the version will serve with.
        if cfg.rebalances_head() and HEAD_WEIGHTS[0] in new_weights:
            new_weights, head = rebalance_head(self.gather, cfg, server_round, new_weights,
                                               sorted(fit.participants))
        server_start = clock()
        predictions = self.deps.model_ops.server_predictions(cfg, new_weights)
        server_wall = clock() - server_start
        # The membership audit only where the version may be promoted (audit_plan), judged
        # on the server test split before the hospitals evaluate.
        skipped: dict[str, str] = {}
        if cfg.membership_images:
            reason = audit_skipped(
                cfg, self.floors,
                server_test_report(*predictions, None)[1] if predictions is not None else None,
                None, None, forced=server_round in (MEMBERSHIP_REFERENCE_ROUND, cfg.rounds),
                before_calibration=True)
            if reason is not None:
                skipped["membership"] = reason
        eval_start = clock()
        # The membership audit counts a hospital's training images as members only once the
        # model has trained on them: it took part in this round or an earlier one.
        trained = set(fit.participants).union(
            *(r.get("participants", {}) for r in self.record["rounds"]))
        evaluations, calibration_sums = evaluate(self.gather, cfg, server_round, new_weights,
                                                 fit.answered, trained,
                                                 membership="membership" not in skipped)
        eval_wall = clock() - eval_start
        summary, audit_wall = self._summary(cfg, server_round, fit, evaluations, new_weights,
                                            calibration_sums, predictions, skipped)
        if skipped:
            summary["audit_skipped"] = skipped
        slowest = max((fit.reports[h].timings.get("total_s", 0.0)
                       for h in fit.participants if h in fit.reports), default=0.0)
        if fit.secure is not None:
            summary["secure_aggregation"] = fit.secure
        if bn_calibration is not None:
            summary["bn_calibration"] = bn_calibration
        if head is not None:
            summary["head_rebalance"] = head
        if cfg.privacy is not None and cfg.privacy.example:
            privacy = example_summary(cfg, fit.reports, self.record["rounds"])
        elif privacy is not None:
            privacy["epsilon"] = dp_epsilon(cfg, server_round)
        if privacy is not None:
            epsilon = float(privacy["epsilon"])  # type: ignore[arg-type]
            summary["privacy"] = privacy
            if np.isfinite(epsilon):  # an MLflow metric per round
                summary["global"]["dp_epsilon"] = epsilon
        summary["timings"] = {"round_s": clock() - started, "fit_wall_s": fit.wall_s,
                              "slowest_client_s": slowest,
                              "overhead_s": max(0.0, fit.wall_s - slowest), "eval_s": eval_wall,
                              "slowest_eval_client_s": max(
                                  (float(e.seconds) for e in evaluations.values()), default=0.0),
                              "server_test_s": server_wall, "audit_s": audit_wall}
        self.record["rounds"].append(summary)
        self.deps.store.write_checkpoint(self.record, server_round, new_weights,
                                         strategy.state(), rng.bit_generator.state)
        self.event(f"round {server_round} done: " + ", ".join(
            f"{k}={v:.4f}" for k, v in summary["global"].items()
            if k.endswith(("accuracy", "macro_f1"))), round=server_round)
        self._track(cfg, summary, new_weights)
        return new_weights

    def _fit(self, cfg: RunConfig, strategy: Strategy, rng: np.random.Generator,
             server_round: int, weights: Weights) -> FitRound:
        """Select, send fit, collect and check, retrying until the quorum of usable updates
        holds (RunFailed after the last attempt; RoundAborted when the round cannot be)."""
        g, clock = self.gather, self.deps.clock
        blob = encode_weights(weights)
        last_reason = ""
        poisson = poisson_sampling(cfg)
        # A resampled retry would change the sampling the accountant assumes: one attempt.
        for attempt in range(1, (1 if poisson else cfg.max_round_retries + 1) + 1):
            self._check()
            deadline = clock() + cfg.round_deadline_s
            selected = g.select(cfg, rng, deadline)
            if "established_hospitals" not in self.record:
                # The run's first selection: every hospital it could choose from is
                # established (its laboratory answered); later ones join on probation.
                self.record["established_hospitals"] = sorted(set(g.candidates) | set(selected))
            if poisson and len(selected) < cfg.min_fit_clients:
                raise RoundAborted(
                    f"the Poisson sample took {len(selected)} of {g.pool_size} hospitals, "
                    f"min_fit_clients is {cfg.min_fit_clients} (the round still counts "
                    "towards epsilon)")
            if len(selected) < cfg.min_fit_clients:
                last_reason = (f"{len(selected)} hospitals available, "
                               f"min_fit_clients is {cfg.min_fit_clients}")
                self.event(f"round {server_round} attempt {attempt} failed: {last_reason}",
                           round=server_round)
                continue
            g.declare(server_round, selected)
            deadline = clock() + cfg.round_deadline_s  # the fit's own, whatever declaring took
            config = fit_config(cfg, self.record["id"], server_round, strategy, deadline)
            named = selected if len(selected) <= 12 else f"{len(selected)} hospitals"
            self.event(f"round {server_round} attempt {attempt}: fit on {named}",
                       round=server_round)
            fit_start = clock()
            if cfg.secure_aggregation is not None:
                clip = (clip_norm(cfg, self.record["rounds"])
                        if cfg.privacy is not None and cfg.privacy.central else 0.0)
                try:
                    s = secure_fit(g, cfg, server_round, selected, blob, config, weights,
                                   strategy.bn_stat_names, clip)
                except SecureAborted as exc:
                    raise RoundAborted(str(exc)) from exc
                return FitRound(attempt, selected, s.answered, s.reports, s.accepted,
                                dict(s.info["participants"]),  # type: ignore[call-overload]
                                {}, s.failures, clock() - fit_start, s.privacy, s.info)
            answers, accepted, participants, reports, rejected, failures = \
                self._collect_updates(cfg, strategy, server_round, selected, blob, config,
                                      deadline, weights)
            wall = clock() - fit_start
            for hospital, reason in rejected.items():
                self.event(f"round {server_round}: update from {hospital} rejected ({reason})",
                           round=server_round, hospital=hospital,
                           rejected=reason.split(":")[0])
            if len(participants) >= cfg.min_fit_clients:
                return FitRound(attempt, selected, sorted(answers), reports, accepted,
                                participants, rejected, failures, wall)
            last_reason = (f"{len(participants)} usable updates, min_fit_clients is "
                           f"{cfg.min_fit_clients} (failed: {failures or 'none'}; rejected: "
                           f"{rejected or 'none'})")
            self.event(f"round {server_round} attempt {attempt} failed: {last_reason}",
                       round=server_round)
        raise RunFailed(f"round {server_round}: quorum not reached after "
                        f"{cfg.max_round_retries + 1} attempts: {last_reason}")

    def _collect_updates(self, cfg: RunConfig, strategy: Strategy, server_round: int,
                         selected: list[str], blob: bytes, config: WireMap, deadline: float,
                         weights: Weights
                         ) -> tuple[dict[str, WireMap], list[ClientResult], dict[str, int],
                                    dict[str, FitReport], dict[str, str], dict[str, str]]:
        """Send fit and check the answers: folded into a running mean as they arrive where
        the rule allows it (update_fold.py), else held, within the memory limit.
        Returns (answers, results for the strategy, participants and their example counts,
        reports, rejected, failures)."""
        g = self.gather

        def check(answers: Mapping[str, WireMap]) -> tuple[dict, dict[str, str]]:
            usable, rejected = check_tensor_answers(
                answers, lambda a, h: g.verify(a, h, server_round, "update", TASK_FIT, blob),
                g.declared, lambda update: validate_update(weights, update,
                                                           max_norm_ratio=cfg.max_norm_ratio))
            for h, (a, _) in list(usable.items()):
                problem = missing_accounting(cfg, a)
                if problem:
                    del usable[h]
                    rejected[h] = problem
            return usable, rejected

        central_dp = cfg.privacy is not None and cfg.privacy.central
        if strategy.streams and not central_dp:
            fold = UpdateFold(check)
            answers, failures = g.ask(server_round, TASK_FIT, selected, blob, config,
                                      deadline, cfg.min_fit_clients, on_answer=fold.take)
            return (answers, fold.accepted(), fold.participants, fold.reports, fold.rejected,
                    failures)
        problem = held_updates_problem(strategy.name + (" with central DP" if central_dp
                                                        else ""), len(selected), len(blob),
                                       self.deps.max_held_updates_mb)
        if problem:
            raise RunFailed(f"round {server_round}: {problem}")
        answers, failures = g.ask(server_round, TASK_FIT, selected, blob, config, deadline,
                                  cfg.min_fit_clients)
        usable, rejected = check(answers)
        accepted = [ClientResult(h, update, a.num_examples, a.metrics)
                    for h, (a, update) in usable.items()]
        reports = {h: a for h, (a, _) in usable.items() if isinstance(a, FitReport)}
        return (answers, accepted, {r.hospital: r.num_examples for r in accepted}, reports,
                rejected, failures)

    def _summary(self, cfg: RunConfig, server_round: int, fit: FitRound,
                 evaluations: dict, weights: Weights,
                 calibration_sums: CalibrationSums | None,
                 predictions: tuple[np.ndarray, np.ndarray] | None,
                 skipped: dict[str, str]) -> tuple[RoundSummary, float]:
        """Pool the round (round_logic), read the new model's ``predictions`` on the server's
        test split, and audit it there where it may be promoted (audit_plan; ``skipped``
        gets the reason where not). Returns the summary and the audit's seconds."""
        pooled = pool_round(fit.reports, fit.participants, evaluations, cfg.coverage,
                            calibration_sums, self.record.get("established_hospitals"),
                            cfg.join_probation_margin)
        self.record["established_hospitals"] = pooled.established
        for hospital, message in pooled.left_out:
            self.event(f"round {server_round}: {hospital} {message}", round=server_round,
                       hospital=hospital)
        conformal = None
        audit_wall = 0.0
        if predictions is not None:
            metrics, cm, conformal = server_test_report(*predictions, pooled.calibration)
            pooled.global_metrics.update({f"server_test_{k}": v for k, v in metrics.items()})
            pooled.confusion["server_test"] = cm
            if pooled.stain_targets is not None:
                reason = audit_skipped(cfg, self.floors, cm, pooled.calibration, conformal,
                                       forced=server_round == cfg.rounds)
                if reason is None:
                    # A version is read beside what colour alone achieves: leukofed.audit.
                    start = self.deps.clock()
                    pooled.global_metrics.update(self.deps.model_ops.server_audit(
                        cfg, weights, pooled.stain_targets, predictions[1]))
                    audit_wall = self.deps.clock() - start
                else:
                    skipped["colour"] = reason
        return round_summary(server_round, fit.attempt, fit.selected, fit.answered,
                             fit.reports, fit.participants, fit.rejected, fit.failures,
                             evaluations, pooled, conformal), audit_wall

    def _abort_round(self, cfg: RunConfig, server_round: int, weights: Weights,
                     strategy: Strategy, rng: np.random.Generator, reason: str) -> Weights:
        """A round that cannot complete: logged, no model registered, the global model
        unchanged, and the run goes on with the next round."""
        self.event(f"round {server_round} aborted: {reason}", round=server_round)
        self.record.setdefault("aborted_rounds", []).append({"round": server_round,
                                                             "reason": reason})
        self.deps.store.write_checkpoint(self.record, server_round, weights, strategy.state(),
                                         rng.bit_generator.state)
        self.record["registered_round"] = server_round
        self.deps.store.save(self.record)
        return weights

    def _track(self, cfg: RunConfig, summary: RoundSummary, weights: Weights) -> None:
        rec, tracker, clock = self.record, self.deps.tracker, self.deps.clock
        start = clock()
        timings = summary.setdefault("timings", {})
        if tracker is not None:
            tracker.log_round(rec, summary)
            logged = clock()
            timings["log_s"] = logged - start
            if cfg.register_models:
                # The tracker may add its parts (register_keras_s, onnx_s, card_s) to timings.
                version = tracker.register(rec, cfg, summary, weights)
                timings["register_s"] = clock() - logged
                if version is not None:
                    rec["versions"][str(summary["round"])] = version
        # After the round's MLflow metrics: the run record (run status) has them.
        timings["track_s"] = clock() - start
        rec["registered_round"] = summary["round"]
        self.deps.store.save(rec)
