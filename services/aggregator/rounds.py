"""The round loop of one federated run.

select -> dispatch fit -> wait (all answered, or the deadline with a quorum) -> validate ->
aggregate -> [BatchNorm calibration] -> federated evaluation -> checkpoint -> track (MLflow,
registry).

I/O sits behind three small interfaces (Dispatcher: Celery; ModelOps: Keras; Tracker:
MLflow), so unit tests drive this loop with fakes and the decisions themselves are pure
functions in ``round_logic.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from leukofed.protocol import RoundConfig
from leukofed.signing import SignatureRejected, blob_digest
from leukofed.strategies import ClientResult, Strategy, make_strategy, pool_batchnorm_stats
from leukofed.transport import TASK_CALIBRATE, TASK_EVALUATE, TASK_FIT
from leukofed.validation import (
    UpdateRejected,
    check_declared,
    validate_answer_scalars,
    validate_batchnorm_stats,
    validate_evaluation,
    validate_update,
)
from leukofed.wire import WireFormatError, decode_weights, encode_weights
from services.aggregator.config import RunConfig
from services.aggregator.round_logic import (
    calibration_metrics,
    combine_evaluations,
    hospital_metrics,
    poisson_sample,
    pool_calibration,
    pool_training_profiles,
    quorum_possible,
    select_hospitals,
    server_test_report,
    training_class_counts,
)
from services.aggregator.run_records import RunStore
from services.aggregator.secure import SecureAborted

log = logging.getLogger(__name__)
Weights = dict[str, np.ndarray]


class Dispatcher(Protocol):
    def live_hospitals(self) -> set[str] | None: ...
    def submit(self, hospital: str, task: str, args: list[Any], expires: float) -> Any: ...
    def poll(self, handle: Any) -> tuple[bool, dict[str, Any] | None, str | None]: ...
    def discard(self, handle: Any) -> None: ...


class ModelOps(Protocol):
    def initial(self, cfg: RunConfig) -> tuple[Weights, set[str]]: ...
    def server_predictions(self, cfg: RunConfig, weights: Weights
                           ) -> tuple[np.ndarray, np.ndarray] | None: ...
    def server_audit(self, cfg: RunConfig, weights: Weights, stain_targets: Any
                     ) -> dict[str, float]: ...


class Tracker(Protocol):
    def start(self, record: dict[str, Any], cfg: RunConfig) -> str | None: ...
    def log_round(self, record: dict[str, Any], summary: dict[str, Any]) -> None: ...
    def register(self, record: dict[str, Any], cfg: RunConfig, summary: dict[str, Any],
                 weights: Weights) -> str | None: ...
    def finish(self, record: dict[str, Any]) -> None: ...


# Checks a fit answer's signature (leukofed.signing.UpdateVerifier); raises SignatureRejected.
# Called as (answer, hospital, run, round, kind=..., global_digest=..., task_id=...).
UpdateCheck = Callable[..., None]


class RunFailed(Exception):
    """The run cannot go on; the message is the reason shown to the user."""


class RunCancelled(Exception):
    pass


class BudgetReached(Exception):
    """The next round would spend more privacy than the run's target epsilon."""


class RunInterrupted(Exception):
    """The aggregator is shutting down: the run stays 'running' and resumes on restart."""


def fit_config(cfg: RunConfig, record_id: str, server_round: int, strategy: Strategy,
               deadline: float) -> dict[str, Any]:
    """What a hospital needs to train this round (leukofed.protocol.RoundConfig)."""
    return RoundConfig.build(
        run_id=record_id, round=server_round, model=cfg.model, image_size=cfg.image_size,
        alpha=cfg.alpha, norm=cfg.norm, cell_focus=cfg.cell_focus,
        rotation_ensemble=cfg.rotation_ensemble, augmentation=cfg.augmentation,
        send_profile=cfg.privacy is None, local_epochs=cfg.local_epochs,
        batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
        class_balanced=cfg.class_balanced, bn_mode=cfg.bn_mode, fp16=cfg.fp16, seed=cfg.seed,
        jit_compile=cfg.jit_compile, deadline=deadline, **_local_dp(cfg),
        **strategy.configure_fit(server_round))


def _local_dp(cfg: RunConfig) -> dict[str, Any]:
    p = cfg.privacy
    if p is None or p.mode != "local":
        return {}
    return {"dp_mode": "local", "dp_clip_norm": p.clip_norm,
            "dp_noise_multiplier": p.noise_multiplier}


def poisson_sampling(cfg: RunConfig) -> bool:
    """Central DP with a sampled share of hospitals: each is taken with probability
    ``fraction``, independently, from OS entropy, as the accountant assumes."""
    return cfg.privacy is not None and cfg.privacy.mode == "central" and cfg.fraction < 1


def dp_sampling_rate(cfg: RunConfig) -> float:
    """q for the accountant. Central: the share of hospitals sampled per round (amplification
    assumes the choice is random and not known to the attacker). Local: each hospital's
    release counts in full, so 1."""
    if cfg.privacy is None or cfg.privacy.mode == "local":
        return 1.0
    return cfg.fraction


def dp_epsilon(cfg: RunConfig, rounds: int) -> float:
    from leukofed.privacy import epsilon

    assert cfg.privacy is not None
    return epsilon(cfg.privacy.noise_multiplier, rounds, cfg.privacy.delta,
                   dp_sampling_rate(cfg))


class FederatedRun:
    def __init__(self, record: dict[str, Any], store: RunStore, dispatcher: Dispatcher,
                 model_ops: ModelOps, tracker: Tracker | None = None,
                 poll_interval_s: float = 0.25, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep,
                 verifier: UpdateCheck | None = None) -> None:
        self.record = record
        self.verifier = verifier
        self.store = store
        self.dispatcher = dispatcher
        self.model_ops = model_ops
        self.tracker = tracker
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        self.sleep = sleep
        self.cancel_requested = bool(record.get("cancel_requested"))
        self.stop_requested = False
        self._late: list[tuple[int, str, str, Any]] = []  # (round, hospital, task, handle)
        # What each hospital declared at enrolment (describe): split sizes bound its claims.
        self._declared: dict[str, dict[str, int]] = {}
        self._pool_size = 0  # hospitals the last Poisson sample was drawn from
        self._task_ids: dict[tuple[str, str], str] = {}  # (task, hospital) -> Celery task id

    # ------------------------------------------------------------ bookkeeping

    def event(self, message: str, **fields: Any) -> None:
        log.info("run %s: %s", self.record["id"], message)
        self.store.event(self.record, message, **fields)
        self.store.save(self.record)

    def _check(self) -> None:
        if self.cancel_requested:
            raise RunCancelled()
        if self.stop_requested:
            raise RunInterrupted()

    # ------------------------------------------------------------ the run

    def execute(self) -> dict[str, Any]:
        rec = self.record
        cfg = RunConfig(**rec["config"])
        try:
            self._check()
            rec["status"], rec["reason"] = "running", None
            self.store.save(rec)
            weights, bn_names = self.model_ops.initial(cfg)
            strategy = make_strategy(cfg.strategy, bn_mode=cfg.bn_mode,
                                     bn_stat_names=bn_names, **cfg.strategy_params)
            rng = np.random.default_rng(cfg.seed)
            checkpoint = self.store.read_checkpoint(rec)
            if checkpoint is not None:
                weights, state = checkpoint
                strategy.load_state(state)
                rng.bit_generator.state = rec["rng_state"]
                self.event(f"resumed after round {rec['completed_round']}")
            if self.tracker is not None and rec.get("mlflow_run_id") is None:
                rec["mlflow_run_id"] = self.tracker.start(rec, cfg)
                self.store.save(rec)
            elif self.tracker is not None:
                self.tracker.start(rec, cfg)  # re-attach to the existing MLflow run
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
                self._check_budget(cfg, server_round)
                rec["current_round"] = server_round
                self.store.save(rec)
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

    def _check_budget(self, cfg: RunConfig, server_round: int) -> None:
        p = cfg.privacy
        if p is None or p.target_epsilon is None:
            return
        after = dp_epsilon(cfg, server_round)
        if after > p.target_epsilon:
            spent = dp_epsilon(cfg, server_round - 1)
            raise BudgetReached(
                f"privacy budget reached after {server_round - 1} rounds: epsilon {spent:.3f} "
                f"at delta {p.delta:g}; round {server_round} would make it {after:.3f} > "
                f"target {p.target_epsilon:g}")

    def _clip_norm(self, cfg: RunConfig) -> float:
        """The current clip norm: adaptive clipping carries it from round to round (in the
        round summaries, so a resumed run continues with it)."""
        assert cfg.privacy is not None
        for summary in reversed(self.record["rounds"]):
            if "privacy" in summary:
                return float(summary["privacy"]["next_clip_norm"])
        return cfg.privacy.clip_norm

    def _privatize(self, cfg: RunConfig, weights: Weights, accepted: list[ClientResult],
                   selected: list[str]) -> tuple[list[ClientResult], dict[str, Any] | None]:
        """Central DP: the clipped, noised mean replaces the individual updates; the strategy
        then only post-processes it. Returns (results for the strategy, privacy summary)."""
        p = cfg.privacy
        if p is None:
            return accepted, None
        clip = self._clip_norm(cfg)
        summary = self._dp_summary(cfg, clip)
        if p.mode == "central":
            from leukofed.privacy import central_mean

            # Noise from the OS entropy pool, never from the run seed: noise that can be
            # regenerated from a known seed can be subtracted, and the privacy is gone.
            res = central_mean(weights, [r.weights for r in accepted], len(selected), clip,
                               p.noise_multiplier, np.random.default_rng(),
                               denominator=self._dp_denominator(cfg, selected),
                               adaptive=p.adaptive_clipping, target_quantile=p.target_quantile,
                               clip_learning_rate=p.clip_learning_rate,
                               count_noise=p.count_noise)
            summary = self._dp_summary(cfg, clip, res)
            accepted = [ClientResult("dp-mean", res.weights,
                                     sum(r.num_examples for r in accepted))]
        return accepted, summary

    @staticmethod
    def _dp_summary(cfg: RunConfig, clip: float, res: Any = None) -> dict[str, Any]:
        """A round's privacy summary; ``res``: the noised step's result (central mode)."""
        assert cfg.privacy is not None
        p = cfg.privacy
        summary: dict[str, Any] = {"mode": p.mode, "noise_multiplier": p.noise_multiplier,
                                   "delta": p.delta, "clip_norm": clip, "next_clip_norm": clip,
                                   "sampling_rate": dp_sampling_rate(cfg)}
        if res is not None:
            summary.update(next_clip_norm=res.next_clip_norm,
                           clipped_fraction=res.clipped_fraction)
        return summary

    def _dp_denominator(self, cfg: RunConfig, selected: list[str]) -> float:
        """Under Poisson sampling the expected sample size; otherwise the hospitals asked."""
        if poisson_sampling(cfg):
            return max(cfg.fraction * self._pool_size, 1e-9)
        return float(len(selected))

    def _finish(self) -> None:
        for _, _, _, handle in self._late:
            self.dispatcher.discard(handle)
        self._late.clear()
        self.store.save(self.record)
        if self.tracker is not None:
            try:
                self.tracker.finish(self.record)
            except Exception:  # tracking must not turn a finished run into a crash
                log.exception("could not close the MLflow run")

    # ------------------------------------------------------------ one round

    def _round(self, cfg: RunConfig, strategy: Strategy, rng: np.random.Generator,
               server_round: int, weights: Weights) -> Weights:
        started = self.clock()
        blob = encode_weights(weights)
        last_reason = ""
        poisson = poisson_sampling(cfg)
        # A resampled retry would change the sampling the accountant assumes: one attempt.
        for attempt in range(1, (1 if poisson else cfg.max_round_retries + 1) + 1):
            self._check()
            deadline = self.clock() + cfg.round_deadline_s
            selected = self._select(cfg, rng, deadline)
            if poisson and len(selected) < cfg.min_fit_clients:
                return self._abort_round(
                    cfg, server_round, weights, strategy, rng,
                    f"the Poisson sample took {len(selected)} of {self._pool_size} hospitals, "
                    f"min_fit_clients is {cfg.min_fit_clients} (the round still counts "
                    "towards epsilon)")
            if len(selected) < cfg.min_fit_clients:
                last_reason = (f"{len(selected)} hospitals available, "
                               f"min_fit_clients is {cfg.min_fit_clients}")
                self.event(f"round {server_round} attempt {attempt} failed: {last_reason}",
                           round=server_round)
                continue
            self._declare(selected)
            config = fit_config(cfg, self.record["id"], server_round, strategy, deadline)
            self.event(f"round {server_round} attempt {attempt}: fit on {selected}",
                       round=server_round)
            fit_start = self.clock()
            if cfg.secure_aggregation is not None:
                try:
                    accepted, answers, failures, secure_dp, secure_info = self._secure_fit(
                        cfg, server_round, selected, blob, config, weights,
                        strategy.bn_stat_names)
                except SecureAborted as exc:
                    return self._abort_round(cfg, server_round, weights, strategy, rng, str(exc))
                rejected = {}
                fit_wall = self.clock() - fit_start
                break
            handles = {h: self.dispatcher.submit(h, TASK_FIT, [blob, config], deadline)
                       for h in selected}
            answers, failures = self._collect(server_round, TASK_FIT, handles, deadline,
                                              cfg.min_fit_clients)
            fit_wall = self.clock() - fit_start
            accepted, rejected = self._validate(server_round, weights, answers, cfg, blob)
            if len(accepted) >= cfg.min_fit_clients:
                break
            last_reason = (f"{len(accepted)} usable updates, min_fit_clients is "
                           f"{cfg.min_fit_clients} (failed: {failures or 'none'}; rejected: "
                           f"{rejected or 'none'})")
            self.event(f"round {server_round} attempt {attempt} failed: {last_reason}",
                       round=server_round)
        else:
            raise RunFailed(f"round {server_round}: quorum not reached after "
                            f"{cfg.max_round_retries + 1} attempts: {last_reason}")
        if cfg.secure_aggregation is not None:  # noise (if any) went onto the sum already
            private, dp_summary, participants = accepted, secure_dp, secure_info["participants"]
        else:
            private, dp_summary = self._privatize(cfg, weights, accepted, selected)
            participants = {r.hospital: r.num_examples for r in accepted}
        new_weights = strategy.aggregate(weights, private, server_round)
        calibration = None
        if cfg.calibrates_batchnorm() and strategy.bn_stat_names:
            new_weights, calibration = self._calibrate(
                cfg, server_round, new_weights, sorted(participants),
                strategy.bn_stat_names, robust=strategy.robust)
        eval_start = self.clock()
        evaluations = self._evaluate(cfg, server_round, new_weights, sorted(answers))
        eval_wall = self.clock() - eval_start
        summary = self._summary(cfg, server_round, attempt, selected, answers, participants,
                                rejected, failures, evaluations, new_weights)
        slowest = max((float(answers[h].get("timings", {}).get("total_s", 0.0))
                       for h in participants), default=0.0)
        if cfg.secure_aggregation is not None:
            summary["secure_aggregation"] = secure_info
        if calibration is not None:
            summary["bn_calibration"] = calibration
        if dp_summary is not None:
            dp_summary["epsilon"] = dp_epsilon(cfg, server_round)
            summary["privacy"] = dp_summary
            if np.isfinite(dp_summary["epsilon"]):  # an MLflow metric per round
                summary["global"]["dp_epsilon"] = dp_summary["epsilon"]
        summary["timings"] = {"round_s": self.clock() - started, "fit_wall_s": fit_wall,
                              "slowest_client_s": slowest,
                              "overhead_s": max(0.0, fit_wall - slowest), "eval_s": eval_wall}
        self.record["rounds"].append(summary)
        self.store.write_checkpoint(self.record, server_round, new_weights, strategy.state(),
                                    rng.bit_generator.state)
        self.event(f"round {server_round} done: " + ", ".join(
            f"{k}={v:.4f}" for k, v in summary["global"].items()
            if k.endswith(("accuracy", "macro_f1"))), round=server_round)
        self._track(cfg, summary, new_weights)
        return new_weights

    def _secure_fit(self, cfg: RunConfig, server_round: int, selected: list[str], blob: bytes,
                    config: dict[str, Any], weights: Weights, bn_names: frozenset[str]
                    ) -> tuple[list[ClientResult], dict[str, dict[str, Any]], dict[str, str],
                               dict[str, Any] | None, dict[str, Any]]:
        """Fit under secure aggregation (services.aggregator.secure): the aggregator gets the
        weighted sum of the deltas and the total weight, and builds the mean update from
        them. With central DP, each hospital clipped its delta (weight 1) and the noise goes
        onto the sum before anything else sees it. Returns (one "secure-sum" result,
        answers without vectors, failures, privacy summary, secure summary)."""
        from leukofed.secagg import VectorSpec
        from services.aggregator.secure import SecureGather, update_ranges

        assert cfg.secure_aggregation is not None
        floats = {n: w for n, w in weights.items() if np.issubdtype(w.dtype, np.floating)}
        dp = cfg.privacy is not None and cfg.privacy.mode == "central"
        ranges = update_ranges(floats, bn_names, cfg.secure_aggregation.update_range)
        clip = self._clip_norm(cfg) if dp else 0.0
        if dp:  # a clipped delta has no coordinate beyond the clip norm
            ranges = {n: min(r, clip) for n, r in ranges.items()}
        spec = VectorSpec(tuple(ranges), tuple(ranges.values()),
                          ("count", "unclipped") if dp else ("count",))
        gather = SecureGather(self, cfg, server_round, "fit")
        extra = ({"dp_clip_norm": clip} if dp else
                 {"update_clip_norm": cfg.secure_aggregation.update_clip_norm})
        result = gather.gather(selected, TASK_FIT, blob, config, floats, spec,
                               cfg.min_fit_clients, extra_secure=extra)
        info = result.summary
        # Per hospital only its declared count is known (its cap), never what it weighed.
        info["participants"] = dict(info["caps"])
        total = result.extras["count"]
        dp_summary = None
        if dp:
            from leukofed.privacy import noised_mean

            assert cfg.privacy is not None
            p = cfg.privacy
            res = noised_mean(weights, result.sums, result.extras["unclipped"], len(selected),
                              clip, p.noise_multiplier, np.random.default_rng(),
                              denominator=self._dp_denominator(cfg, selected),
                              adaptive=p.adaptive_clipping, target_quantile=p.target_quantile,
                              clip_learning_rate=p.clip_learning_rate, count_noise=p.count_noise,
                              num_updates=len(result.answers))
            mean = res.weights
            dp_summary = self._dp_summary(cfg, clip, res)
        else:
            mean = {n: ((w.astype(np.float64) + result.sums[n] / total).astype(w.dtype)
                        if n in result.sums else w.copy()) for n, w in weights.items()}
        info["total_weight"] = total
        self.event(f"round {server_round}: secure sum of {sorted(result.answers)} "
                   f"({info['protocol']}, {info['bits']}-bit, {info['neighbours']} neighbours; "
                   f"dropped after sharing: {info['dropped_after_shares'] or 'none'})",
                   round=server_round)
        accepted = [ClientResult("secure-sum", mean, max(1, int(round(total))))]
        return accepted, result.answers, result.failures, dp_summary, info

    def _abort_round(self, cfg: RunConfig, server_round: int, weights: Weights,
                     strategy: Strategy, rng: np.random.Generator, reason: str) -> Weights:
        """A round that cannot complete securely: logged, no model registered, the global
        model unchanged, and the run goes on with the next round."""
        self.event(f"round {server_round} aborted: {reason}", round=server_round)
        self.record.setdefault("aborted_rounds", []).append({"round": server_round,
                                                             "reason": reason})
        self.store.write_checkpoint(self.record, server_round, weights, strategy.state(),
                                    rng.bit_generator.state)
        self.record["registered_round"] = server_round
        self.store.save(self.record)
        return weights

    def _select(self, cfg: RunConfig, rng: np.random.Generator, deadline: float) -> list[str]:
        """Hospitals for this attempt; with none known yet, wait for some up to the deadline
        (a worker that reconnects after a broker restart shows up within seconds)."""
        while True:
            live = self.dispatcher.live_hospitals()
            if poisson_sampling(cfg):
                pool = sorted(cfg.hospitals or live or ())
                if pool or self.clock() >= deadline:
                    self._pool_size = len(pool)
                    # OS entropy, not the run seed: a sample an attacker can regenerate
                    # gives no amplification.
                    return poisson_sample(pool, cfg.fraction, np.random.default_rng())
                self.sleep(min(1.0, max(0.0, deadline - self.clock())))
                continue
            selected = select_hospitals(cfg.hospitals, live, cfg.fraction,
                                        cfg.min_fit_clients, rng)
            if len(selected) >= cfg.min_fit_clients or self.clock() >= deadline:
                return selected
            self._check()
            self.sleep(min(1.0, max(0.0, deadline - self.clock())))

    def _collect(self, server_round: int, task: str, handles: dict[str, Any], deadline: float,
                 need: int) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Wait until every hospital answered, the deadline passed, or the quorum became
        impossible. Unanswered tasks become 'late': their results are discarded and logged."""
        pending = dict(handles)
        answers: dict[str, dict[str, Any]] = {}
        failures: dict[str, str] = {}
        while pending and self.clock() < deadline and quorum_possible(len(answers), len(pending),
                                                                      need):
            self._check()
            self._drain_late()
            for hospital, handle in list(pending.items()):
                try:
                    done, result, error = self.dispatcher.poll(handle)
                except Exception as exc:  # broker or backend down: keep waiting, it retries
                    log.warning("polling %s: %s", hospital, exc)
                    continue
                if not done:
                    continue
                del pending[hospital]
                self.dispatcher.discard(handle)
                if isinstance(getattr(handle, "id", None), str):  # what its answer must name
                    self._task_ids[(task, hospital)] = handle.id
                if error is not None:
                    failures[hospital] = error
                elif not isinstance(result, dict) or result.get("status") != "ok":
                    status = result.get("status") if isinstance(result, dict) else type(result)
                    reason = result.get("reason") if isinstance(result, dict) else ""
                    failures[hospital] = f"{status}: {reason}"
                else:
                    answers[hospital] = result
            if pending:
                self.sleep(self.poll_interval_s)
        for hospital, handle in pending.items():
            failures[hospital] = "no answer by the deadline"
            self._late.append((server_round, hospital, task, handle))
        for hospital, reason in failures.items():
            self.event(f"round {server_round} {task.rsplit('.', 1)[-1]}: {hospital} {reason}",
                       round=server_round, hospital=hospital)
        return answers, failures

    def _drain_late(self) -> None:
        still = []
        for server_round, hospital, task, handle in self._late:
            try:
                done, _, _ = self.dispatcher.poll(handle)
            except Exception:
                done = False
            if done:
                self.dispatcher.discard(handle)
                self.event(f"late {task.rsplit('.', 1)[-1]} result from {hospital} for round "
                           f"{server_round} discarded", round=server_round, hospital=hospital)
            else:
                still.append((server_round, hospital, task, handle))
        self._late = still

    def _declare(self, hospitals: list[str]) -> None:
        """Ask hospitals not yet known for their declared split sizes (once per run). Without
        a describe channel (or an answer) a hospital's claims are bounded only by the
        other checks."""
        missing = [h for h in hospitals if h not in self._declared]
        describe = getattr(self.dispatcher, "describe", None)
        if not missing or describe is None:
            return
        try:
            answers = describe(missing)
        except Exception as exc:  # the broker hiccuped: try again next round
            log.warning("describe %s: %s", missing, exc)
            return
        for h in missing:
            answer = answers.get(h) or {}
            if self.verifier is not None:
                try:
                    self.verifier(answer, h, "", 0, kind="describe")
                except SignatureRejected as exc:
                    self.event(f"describe answer of {h} refused ({exc.reason}: {exc.message})",
                               hospital=h, rejected=exc.reason)
                    continue
            splits = answer.get("splits")
            if isinstance(splits, dict) and all(
                    isinstance(splits.get(k), int) and not isinstance(splits.get(k), bool)
                    and splits[k] >= 0 for k in ("train", "val", "test")):
                self._declared[h] = {k: int(splits[k]) for k in ("train", "val", "test")}

    def _verify(self, answer: dict[str, Any], hospital: str, server_round: int, kind: str,
                task: str, blob: bytes | None) -> None:
        """The hospital's signature of ``kind`` over this answer, for this run and round, the
        task it answers and the global weights that task carried (when signing is on)."""
        if self.verifier is None:
            return
        self.verifier(answer, hospital, self.record["id"], server_round, kind=kind,
                      global_digest=blob_digest(blob) if blob is not None else None,
                      task_id=self._task_ids.get((task, hospital)))

    def _checked(self, server_round: int, answers: dict[str, dict[str, Any]],
                 check: Callable[[Weights], None], kind: str = "update", task: str = TASK_FIT,
                 blob: bytes | None = None
                 ) -> tuple[dict[str, tuple[int, Weights]], dict[str, str]]:
        """Signature first (nothing unsigned is even decoded), then a positive example count
        within what the hospital declared, the answer's other numbers, the wire format and
        ``check`` on the decoded tensors. Returns {hospital: (count, tensors)} and
        {hospital: reason}; a bad answer is a reason, never an exception."""
        usable: dict[str, tuple[int, Weights]] = {}
        rejected: dict[str, str] = {}
        for hospital, answer in sorted(answers.items()):
            try:
                self._verify(answer, hospital, server_round, kind, task, blob)
                n = answer.get("num_examples")
                if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                    raise UpdateRejected("schema", f"num_examples must be a positive int, "
                                                   f"got {n!r}")
                check_declared(n, self._declared.get(hospital, {}).get("train"))
                validate_answer_scalars(answer)
                tensors = decode_weights(answer.get("weights"))
                check(tensors)
            except (SignatureRejected, UpdateRejected) as exc:
                rejected[hospital] = f"{exc.reason}: {exc.message}"
            except WireFormatError as exc:
                rejected[hospital] = f"wire: {exc}"
            else:
                usable[hospital] = (n, tensors)
        return usable, rejected

    def _validate(self, server_round: int, weights: Weights, answers: dict[str, dict[str, Any]],
                  cfg: RunConfig, blob: bytes | None = None
                  ) -> tuple[list[ClientResult], dict[str, str]]:
        usable, rejected = self._checked(
            server_round, answers,
            lambda update: validate_update(weights, update, max_norm_ratio=cfg.max_norm_ratio),
            blob=blob)
        accepted = [ClientResult(h, update, n, answers[h].get("metrics", {}))
                    for h, (n, update) in usable.items()]
        for hospital, reason in rejected.items():
            self.event(f"round {server_round}: update from {hospital} rejected ({reason})",
                       round=server_round, hospital=hospital, rejected=reason.split(":")[0])
        return accepted, rejected

    def _calibrate(self, cfg: RunConfig, server_round: int, weights: Weights,
                   hospitals: list[str], bn_names: frozenset[str], robust: bool = False
                   ) -> tuple[Weights, dict[str, Any]]:
        """Replace the new global model's BatchNorm statistics by those the round's hospitals
        measure on it, pooled exactly or by median (leukofed.strategies.pool_batchnorm_stats).
        Statistics that fail a check are rejected with a logged reason; with none usable the
        averaged statistics stay and the round goes on."""
        start = self.clock()
        current = {n: weights[n] for n in sorted(bn_names)}
        if cfg.secure_aggregation is not None:
            return self._secure_calibrate(cfg, server_round, weights, hospitals, current, start)
        answers, failures, blob = self._ask(cfg, server_round, TASK_CALIBRATE, weights,
                                            hospitals, bn_mode="average",
                                            calibration_images=cfg.calibration_images)
        usable, rejected = self._checked(
            server_round, answers,
            lambda measured: validate_batchnorm_stats(current, measured,
                                                      max_norm_ratio=cfg.max_norm_ratio),
            kind="calibration", task=TASK_CALIBRATE, blob=blob)
        used = {h: n for h, (n, _) in usable.items()}
        stats = [measured for _, measured in usable.values()]
        for hospital, reason in rejected.items():
            self.event(f"round {server_round}: BatchNorm statistics from {hospital} rejected "
                       f"({reason})", round=server_round, hospital=hospital,
                       rejected=reason.split(":")[0])
        summary = {"hospitals": used, "rejected": rejected, "failed": failures,
                   "pooling": "median" if robust else "exact", "seconds": self.clock() - start}
        if not stats:
            self.event(f"round {server_round}: no usable BatchNorm statistics; the averaged "
                       "ones stay", round=server_round)
            return weights, summary
        pooled = pool_batchnorm_stats(stats, [float(n) for n in used.values()], robust=robust)
        out = dict(weights)
        out.update({n: pooled[n].astype(weights[n].dtype) for n in pooled})
        return out, summary

    def _secure_calibrate(self, cfg: RunConfig, server_round: int, weights: Weights,
                          hospitals: list[str], current: Weights, start: float
                          ) -> tuple[Weights, dict[str, Any]]:
        """BatchNorm calibration as a secure sum of first and second moments weighted by
        image counts: exact pooling, and no hospital's statistics seen on their own. An
        aborted sum keeps the averaged statistics, like a calibration nobody answered."""
        from leukofed.secagg import VectorSpec, bn_from_moments
        from services.aggregator.secure import SecureGather, moment_ranges

        ranges = moment_ranges(current)
        spec = VectorSpec(tuple(ranges), tuple(ranges.values()))
        config = self._task_config(cfg, server_round, bn_mode="average",
                                   calibration_images=cfg.calibration_images)
        try:
            result = SecureGather(self, cfg, server_round, "calibrate").gather(
                hospitals, TASK_CALIBRATE, encode_weights(weights), config, current, spec, 2)
        except SecureAborted as exc:
            self.event(f"round {server_round}: {exc}; the averaged BatchNorm statistics stay",
                       round=server_round)
            return weights, {"pooling": "secure", "aborted": str(exc),
                             "seconds": self.clock() - start}
        count = result.extras["count"]
        pooled = bn_from_moments({n: v / count for n, v in result.sums.items()})
        out = dict(weights)
        out.update({n: pooled[n].astype(weights[n].dtype) for n in pooled})
        return out, {"hospitals": result.summary["caps"], "failed": result.failures,
                     "pooling": "secure", "secure_aggregation": result.summary,
                     "seconds": self.clock() - start}

    def _task_config(self, cfg: RunConfig, server_round: int, **config: Any) -> dict[str, Any]:
        return RoundConfig.build(
            run_id=self.record["id"], round=server_round, model=cfg.model,
            image_size=cfg.image_size, alpha=cfg.alpha, norm=cfg.norm,
            cell_focus=cfg.cell_focus, rotation_ensemble=cfg.rotation_ensemble,
            jit_compile=cfg.jit_compile, deadline=self.clock() + cfg.round_deadline_s,
            **config)

    def _ask(self, cfg: RunConfig, server_round: int, task: str, weights: Weights,
             hospitals: list[str], **config: Any
             ) -> tuple[dict[str, dict[str, Any]], dict[str, str], bytes]:
        """Send ``task`` with these global weights to every hospital and wait for them all or
        the round deadline, with no quorum: evaluation and calibration use whoever answers.
        Returns (answers, failures, the weight blob sent, which signed answers name)."""
        config = self._task_config(cfg, server_round, **config)
        deadline = float(config["deadline"])
        blob = encode_weights(weights)
        handles = {h: self.dispatcher.submit(h, task, [blob, config], deadline)
                   for h in hospitals}
        return (*self._collect(server_round, task, handles, deadline, 0), blob)

    def _evaluate(self, cfg: RunConfig, server_round: int, weights: Weights,
                  hospitals: list[str]) -> dict[str, dict[str, Any]]:
        """Evaluation answers that hold together (leukofed.validation.validate_evaluation);
        the others are logged with their reason and left out of every pooled number."""
        if not hospitals:
            return {}
        answers, _, blob = self._ask(cfg, server_round, TASK_EVALUATE, weights, hospitals,
                                     bn_mode=cfg.bn_mode)
        valid = {}
        for hospital, answer in sorted(answers.items()):
            try:
                self._verify(answer, hospital, server_round, "evaluation", TASK_EVALUATE, blob)
                validate_evaluation(answer, self._declared.get(hospital))
            except (SignatureRejected, UpdateRejected) as exc:
                self.event(f"round {server_round}: evaluation from {hospital} rejected "
                           f"({exc.reason}: {exc.message})", round=server_round,
                           hospital=hospital, rejected=exc.reason)
            else:
                valid[hospital] = answer
        return valid

    def _summary(self, cfg: RunConfig, server_round: int, attempt: int, selected: list[str],
                 answers: dict[str, dict[str, Any]], participants: dict[str, int],
                 rejected: dict[str, str], failures: dict[str, str],
                 evaluations: dict[str, dict[str, Any]], weights: Weights) -> dict[str, Any]:
        pooled, matrices = combine_evaluations(evaluations)
        global_metrics = {f"{split}_{k}": v for split, m in pooled.items() for k, v in m.items()}
        used = set(participants)
        profile, stain_targets, skipped = pool_training_profiles(answers, used)
        for hospital, reason in skipped.items():
            self.event(f"round {server_round}: {hospital} left out of the acquisition "
                       f"profile ({reason})", round=server_round, hospital=hospital)
        calibration, unusable = pool_calibration(evaluations, cfg.coverage)
        for hospital, reason in unusable.items():
            self.event(f"round {server_round}: {hospital} left out of calibration ({reason})",
                       round=server_round, hospital=hospital)
        if calibration is not None:
            global_metrics.update(calibration_metrics(calibration))
        conformal = None
        predictions = self.model_ops.server_predictions(cfg, weights)
        if predictions is not None:
            metrics, cm, conformal = server_test_report(*predictions, calibration)
            global_metrics.update({f"server_test_{k}": v for k, v in metrics.items()})
            matrices["server_test"] = cm
            if stain_targets is not None:
                # Every version is read beside what colour alone achieves: leukofed.audit.
                global_metrics.update(self.model_ops.server_audit(cfg, weights, stain_targets))
        return {
            "acquisition_profile": profile, "stain_targets": stain_targets,
            "calibration": calibration, "server_conformal": conformal,
            "class_counts": training_class_counts(answers, used),
            "round": server_round, "attempt": attempt, "selected": selected,
            "participants": dict(participants),
            "rejected": rejected, "failed": failures,
            "global": global_metrics, "confusion": matrices,
            "hospitals": {h: hospital_metrics(answers.get(h) if h in used else None,
                                              evaluations.get(h))
                          for h in sorted(set(answers) | set(evaluations))},
            "bytes": {h: int(answers[h].get("bytes", 0)) for h in sorted(used)},
            "sha256": {h: str(answers[h].get("sha256", "")) for h in sorted(used)},
            "fingerprints": {h: str(answers[h].get("dataset_fingerprint", ""))
                             for h in sorted(used)},
        }

    def _track(self, cfg: RunConfig, summary: dict[str, Any], weights: Weights) -> None:
        rec = self.record
        if self.tracker is not None:
            self.tracker.log_round(rec, summary)
            if cfg.register_models:
                version = self.tracker.register(rec, cfg, summary, weights)
                if version is not None:
                    rec["versions"][str(summary["round"])] = version
        rec["registered_round"] = summary["round"]
        self.store.save(rec)
