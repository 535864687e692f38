"""The gather step of a round: choose hospitals, send them a task, collect what comes back by
the deadline, and discard what arrives too late. Also each hospital's declaration (describe),
which bounds every count it claims later.

Answers come back as they crossed the wire (leukofed.protocol.WireAnswer): their signature
is over those bytes, and nothing is decoded before it is checked (leukofed.validation).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from leukofed.liveness import HEARTBEAT_TTL_S
from leukofed.protocol import DeclaredSplits, DescribeAnswer, RoundConfig, WireAnswer
from leukofed.signing import SignatureRejected, blob_digest
from leukofed.transport import TASK_DESCRIBE
from services.aggregator.config import RunConfig
from services.aggregator.deps import RunDeps
from services.aggregator.privacy_step import poisson_sampling
from services.aggregator.round_logic import poisson_sample, quorum_possible, select_hospitals

if TYPE_CHECKING:
    from celery.result import AsyncResult

Handles = dict[str, "AsyncResult"]  # hospital -> its task in flight (a fake in unit tests)

log = logging.getLogger(__name__)
Event = Callable[..., None]  # (message, **fields): the run's event log
OnAnswer = Callable[[str, WireAnswer], WireAnswer]  # (hospital, answer) -> what to keep


class Gather:
    """Task traffic of one run. ``check`` raises when the run is cancelled or stopping."""

    def __init__(self, deps: RunDeps, run_id: str, event: Event, check: Callable[[], None]
                 ) -> None:
        self.deps, self.run_id, self.event, self.check = deps, run_id, event, check
        self.late: list[tuple[int, str, str, Any]] = []  # (round, hospital, task, handle)
        # What each hospital declared at enrolment (describe): split sizes bound its claims.
        self.declared: dict[str, DeclaredSplits] = {}
        self.pool_size = 0  # hospitals the last Poisson sample was drawn from
        self.task_ids: dict[tuple[str, str], str] = {}  # (task, hospital) -> Celery task id
        self.beating: set[str] = set()  # hospitals whose worker heartbeat was seen
        # The step in progress (round, task, selected, answered, failed, deadline): shown by
        # the run's API and /metrics while a round runs.
        self.progress: dict[str, object] = {}
        self.candidates: list[str] = []  # the hospitals the last selection chose from

    # ------------------------------------------------------------ select

    def select(self, cfg: RunConfig, rng: np.random.Generator, deadline: float) -> list[str]:
        """Hospitals for this attempt; with none known yet, wait for some up to the deadline
        (a worker that reconnects after a broker restart shows up within seconds)."""
        d = self.deps
        while True:
            live = self.live(cfg.hospitals)
            # Who could have been chosen: a run's first selection makes them its established
            # hospitals (round_logic.profile_members), sampled this round or not.
            pool = set(cfg.hospitals or ()) if live is None else set(live)
            self.candidates = sorted(pool & set(cfg.hospitals) if cfg.hospitals else pool)
            if poisson_sampling(cfg):
                pool = sorted(cfg.hospitals or live or ())
                if pool or d.clock() >= deadline:
                    self.pool_size = len(pool)
                    # OS entropy, not the run seed: a sample an attacker can regenerate
                    # gives no amplification.
                    return poisson_sample(pool, cfg.fraction, np.random.default_rng())
                d.sleep(min(1.0, max(0.0, deadline - d.clock())))
                continue
            selected = select_hospitals(cfg.hospitals, live, cfg.fraction,
                                        cfg.min_fit_clients, rng)
            if len(selected) >= cfg.min_fit_clients or d.clock() >= deadline:
                return selected
            self.check()
            d.sleep(min(1.0, max(0.0, deadline - d.clock())))

    def live(self, candidates: list[str] | None) -> set[str] | None:
        """Hospitals whose worker is live: every named one with a fresh heartbeat answers
        at once (one read of Redis keys); otherwise a remote-control broadcast, which waits
        the full ping timeout and misses workers busy training, joined with the beating
        ones. None: the broker is unreachable."""
        beating: set[str] = set()
        read = getattr(self.deps.dispatcher, "heartbeats", None)
        if candidates and read is not None:
            try:
                beating = {h for h, t in read(sorted(candidates)).items() if t is not None}
            except Exception as exc:  # the broker hiccuped: ask the workers instead
                log.warning("reading heartbeats: %s", exc)
            self.beating |= beating
            if beating == set(candidates):
                return beating
        live = self.deps.dispatcher.live_hospitals()
        return beating | live if live is not None else (beating or None)

    # ------------------------------------------------------------ send and collect

    def send(self, task: str, args_of: Mapping[str, list[Any]], deadline: float
             ) -> Handles:
        return {h: self.deps.dispatcher.submit(h, task, args, deadline)
                for h, args in args_of.items()}

    def ask(self, server_round: int, task: str, hospitals: list[str], blob: bytes,
            config: Mapping[str, object], deadline: float, need: int = 0,
            on_answer: OnAnswer | None = None
            ) -> tuple[dict[str, WireAnswer], dict[str, str]]:
        """Send ``task`` with ``blob`` and ``config`` to every hospital, at most
        ``deps.max_in_flight`` at a time, and collect."""
        return self.collect(server_round, task, {}, deadline, need, waiting=list(hospitals),
                            args=[blob, config], on_answer=on_answer)

    def collect(self, server_round: int, task: str, handles: Handles, deadline: float,
                need: int, waiting: list[str] | None = None, args: list[Any] | None = None,
                on_answer: OnAnswer | None = None
                ) -> tuple[dict[str, WireAnswer], dict[str, str]]:
        """Wait until every hospital answered, the deadline passed, or the quorum became
        impossible. ``waiting`` hospitals get the task (``args``) as the window frees up.
        A hospital whose worker stopped beating (leukofed.liveness) fails at once instead of
        at the deadline. Unanswered tasks become 'late': their results are discarded.

        ``on_answer(hospital, answer)`` sees each answer as it arrives and returns what to
        keep of it: the fit step folds the update into a running sum and keeps no tensors,
        so the aggregator's memory does not grow with the number of hospitals."""
        d = self.deps
        pending = dict(handles)
        queue = list(waiting or ())
        window = d.max_in_flight if d.max_in_flight > 0 else len(queue) + len(pending)
        answers: dict[str, WireAnswer] = {}
        failures: dict[str, str] = {}
        next_liveness = d.clock() + d.liveness_check_s
        self.progress = {"round": server_round, "task": task.rsplit(".", 1)[-1],
                         "selected": len(pending) + len(queue), "answered": 0,
                         "failed": 0, "deadline": deadline}
        while (pending or queue) and d.clock() < deadline and quorum_possible(
                len(answers), len(pending) + len(queue), need):
            self.check()
            while queue and len(pending) < window:
                hospital = queue.pop(0)
                pending[hospital] = d.dispatcher.submit(hospital, task, args or [], deadline)
            self.drain_late()
            for hospital, handle in list(pending.items()):
                try:
                    done, result, error = d.dispatcher.poll(handle)
                except Exception as exc:  # broker or backend down: keep waiting, it retries
                    log.warning("polling %s: %s", hospital, exc)
                    continue
                if not done:
                    continue
                del pending[hospital]
                d.dispatcher.discard(handle)
                if isinstance(getattr(handle, "id", None), str):  # what its answer must name
                    self.task_ids[(task, hospital)] = handle.id
                if error is not None:
                    failures[hospital] = error
                elif not isinstance(result, dict) or result.get("status") != "ok":
                    status = result.get("status") if isinstance(result, dict) else type(result)
                    reason = result.get("reason") if isinstance(result, dict) else ""
                    failures[hospital] = f"{status}: {reason}"
                    if reason == "privacy_budget":  # the hospital's own numbers, for the run
                        failures[hospital] += f" ({str(result.get('message', ''))[:300]})"
                    unverified = self.unverified_refusal(result, hospital, server_round, task)
                    if unverified:  # said, but not by the hospital's key: marked so
                        failures[hospital] += f" [unverified: {unverified}]"
                else:
                    answers[hospital] = on_answer(hospital, result) if on_answer else result
            if pending and d.clock() >= next_liveness:
                next_liveness = d.clock() + d.liveness_check_s
                for hospital in self.lost(sorted(pending)):
                    failures[hospital] = (f"worker lost: no heartbeat for over "
                                          f"{HEARTBEAT_TTL_S:.0f} s")
                    self.late.append((server_round, hospital, task, pending.pop(hospital)))
            self.progress.update(answered=len(answers), failed=len(failures))
            if pending or queue:
                d.sleep(d.poll_interval_s)
        for hospital, handle in pending.items():
            failures[hospital] = "no answer by the deadline"
            self.late.append((server_round, hospital, task, handle))
        for hospital in queue:  # never sent: the quorum was already out of reach
            failures[hospital] = "not asked: the quorum was out of reach"
        self.progress.update(answered=len(answers), failed=len(failures))
        for hospital, reason in failures.items():
            self.event(f"round {server_round} {task.rsplit('.', 1)[-1]}: {hospital} {reason}",
                       round=server_round, hospital=hospital)
        return answers, failures

    def unverified_refusal(self, result: object, hospital: str, server_round: int,
                           task: str) -> str:
        """Why a declined or error answer is not known to be the hospital's: '' when it
        carries the hospital's signature (kind ``status``) for this run, round and task, or
        when signing is off. Such an answer never counts; what it says (its reason, a
        privacy-budget message) goes into the events, marked when nobody vouches for it."""
        verifier = self.deps.verifier
        if verifier is None:
            return ""
        if not isinstance(result, dict):
            return "not a map"
        try:
            verifier(result, hospital, self.run_id, server_round, kind="status",
                     task_id=self.task_ids.get((task, hospital)))
        except SignatureRejected as exc:
            return f"{exc.reason}: {exc.message}"
        return ""

    def lost(self, hospitals: list[str]) -> list[str]:
        """Those of ``hospitals`` whose worker has beaten before and stopped. A hospital
        never seen beating (an older worker, or the dispatcher has no heartbeats) is left to
        the deadline."""
        read = getattr(self.deps.dispatcher, "heartbeats", None)
        if read is None:
            return []
        try:
            beats = read(hospitals)
        except Exception as exc:  # the broker hiccuped: the deadline still holds
            log.warning("reading heartbeats: %s", exc)
            return []
        lost = []
        for hospital in hospitals:
            if beats.get(hospital) is not None:
                self.beating.add(hospital)
            elif hospital in self.beating:
                lost.append(hospital)
        return lost

    def drain_late(self) -> None:
        still = []
        for server_round, hospital, task, handle in self.late:
            try:
                done, _, _ = self.deps.dispatcher.poll(handle)
            except Exception:
                done = False
            if done:
                self.deps.dispatcher.discard(handle)
                self.event(f"late {task.rsplit('.', 1)[-1]} result from {hospital} for round "
                           f"{server_round} discarded", round=server_round, hospital=hospital)
            else:
                still.append((server_round, hospital, task, handle))
        self.late = still

    def discard_late(self) -> None:
        """The run is over: nobody will read the answers still on their way."""
        for _, _, _, handle in self.late:
            self.deps.dispatcher.discard(handle)
        self.late.clear()

    # ------------------------------------------------------------ signatures, declarations

    def verify(self, answer: WireAnswer, hospital: str, server_round: int, kind: str,
               task: str, blob: bytes | None) -> None:
        """The hospital's signature of ``kind`` over this answer, for this run and round, the
        task it answers and the global weights that task carried (when signing is on)."""
        verifier = self.deps.verifier
        if verifier is None:
            return
        verifier(answer, hospital, self.run_id, server_round, kind=kind,
                 global_digest=blob_digest(blob) if blob is not None else None,
                 task_id=self.task_ids.get((task, hospital)))

    def declare(self, server_round: int, hospitals: list[str]) -> None:
        """Ask each of ``hospitals`` without a verified declaration for this run to describe
        itself, and keep the split sizes of the answers that hold: signed by the hospital
        for this run, round and task, carrying the fresh nonce sent with it. A describe
        signature was once bound to nothing, so any old one could be replayed.

        A hospital left without one (no answer by ``deps.describe_deadline_s``, declined,
        unsigned, forged, replayed, malformed) is asked again next time; until then nothing
        it sends is counted (leukofed.validation.declaration), and the round goes on with
        the others."""
        missing = [h for h in hospitals if h not in self.declared]
        live = self.live(missing) if missing else None
        if live is not None:  # None: no answer from the broker, so ask every one of them
            # A busy worker still beats; one that neither beats nor answers a ping is gone,
            # and waiting the describe deadline for it would hold up the round.
            for h in sorted(set(missing) - live):
                self.event(f"round {server_round}: {h} is not live, not asked to declare; "
                           "nothing it sends counts until it does", round=server_round,
                           hospital=h)
            missing = [h for h in missing if h in live]
        if not missing:
            return
        nonce = secrets.token_hex(16)
        deadline = self.deps.clock() + self.deps.describe_deadline_s
        config = RoundConfig.build(run_id=self.run_id, round=server_round, nonce=nonce,
                                   deadline=deadline)
        answers, _ = self.collect(server_round, TASK_DESCRIBE, {}, deadline, 0,
                                  waiting=missing, args=[b"", config])
        for h, answer in sorted(answers.items()):
            splits = None
            try:
                self.verify(answer, h, server_round, "describe", TASK_DESCRIBE, None)
                if answer.get("nonce") != nonce:  # also checked unsigned (development mode)
                    raise SignatureRejected("replay", "not an answer to this run's challenge")
                splits = DescribeAnswer.declared_splits(answer)
                reason = "malformed: no train, val and test sizes"
            except SignatureRejected as exc:
                reason = f"{exc.reason}: {exc.message}"
            if splits is None:
                self.event(f"round {server_round}: describe answer of {h} refused ({reason}); "
                           "nothing it sends counts until it declares", round=server_round,
                           hospital=h, rejected=reason.split(":")[0])
                continue
            self.declared[h] = splits
