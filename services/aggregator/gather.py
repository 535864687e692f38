"""The gather step of a round: choose hospitals, send them a task, collect what comes back by
the deadline, and discard what arrives too late. Also each hospital's declaration (describe),
which bounds every count it claims later.

Answers come back as they crossed the wire (leukofed.protocol.WireAnswer): their signature
is over those bytes, and nothing is decoded before it is checked (leukofed.validation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from leukofed.protocol import DeclaredSplits, DescribeAnswer, WireAnswer
from leukofed.signing import SignatureRejected, blob_digest
from services.aggregator.config import RunConfig
from services.aggregator.deps import RunDeps
from services.aggregator.privacy_step import poisson_sampling
from services.aggregator.round_logic import poisson_sample, quorum_possible, select_hospitals

log = logging.getLogger(__name__)
Event = Callable[..., None]  # (message, **fields): the run's event log


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

    # ------------------------------------------------------------ select

    def select(self, cfg: RunConfig, rng: np.random.Generator, deadline: float) -> list[str]:
        """Hospitals for this attempt; with none known yet, wait for some up to the deadline
        (a worker that reconnects after a broker restart shows up within seconds)."""
        d = self.deps
        while True:
            live = d.dispatcher.live_hospitals()
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

    # ------------------------------------------------------------ send and collect

    def send(self, task: str, args_of: Mapping[str, list[Any]], deadline: float
             ) -> dict[str, Any]:
        return {h: self.deps.dispatcher.submit(h, task, args, deadline)
                for h, args in args_of.items()}

    def ask(self, server_round: int, task: str, hospitals: list[str], blob: bytes,
            config: Mapping[str, object], deadline: float, need: int = 0
            ) -> tuple[dict[str, WireAnswer], dict[str, str]]:
        """Send ``task`` with ``blob`` and ``config`` to every hospital and collect."""
        handles = self.send(task, {h: [blob, config] for h in hospitals}, deadline)
        return self.collect(server_round, task, handles, deadline, need)

    def collect(self, server_round: int, task: str, handles: dict[str, Any], deadline: float,
                need: int) -> tuple[dict[str, WireAnswer], dict[str, str]]:
        """Wait until every hospital answered, the deadline passed, or the quorum became
        impossible. Unanswered tasks become 'late': their results are discarded and logged."""
        d = self.deps
        pending = dict(handles)
        answers: dict[str, WireAnswer] = {}
        failures: dict[str, str] = {}
        while pending and d.clock() < deadline and quorum_possible(len(answers), len(pending),
                                                                   need):
            self.check()
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
                else:
                    answers[hospital] = result
            if pending:
                d.sleep(d.poll_interval_s)
        for hospital, handle in pending.items():
            failures[hospital] = "no answer by the deadline"
            self.late.append((server_round, hospital, task, handle))
        for hospital, reason in failures.items():
            self.event(f"round {server_round} {task.rsplit('.', 1)[-1]}: {hospital} {reason}",
                       round=server_round, hospital=hospital)
        return answers, failures

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

    def declare(self, hospitals: list[str]) -> None:
        """Ask hospitals not yet known for their declared split sizes (once per run). Without
        a describe channel (or an answer) a hospital's claims are bounded only by the
        other checks."""
        missing = [h for h in hospitals if h not in self.declared]
        describe = getattr(self.deps.dispatcher, "describe", None)
        if not missing or describe is None:
            return
        try:
            answers = describe(missing)
        except Exception as exc:  # the broker hiccuped: try again next round
            log.warning("describe %s: %s", missing, exc)
            return
        for h in missing:
            answer = answers.get(h) or {}
            if self.deps.verifier is not None:
                try:
                    self.deps.verifier(answer, h, "", 0, kind="describe")
                except SignatureRejected as exc:
                    self.event(f"describe answer of {h} refused ({exc.reason}: {exc.message})",
                               hospital=h, rejected=exc.reason)
                    continue
            splits = DescribeAnswer.declared_splits(answer)
            if splits is not None:
                self.declared[h] = splits
