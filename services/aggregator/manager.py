"""Runs are executed one at a time, in order, by one background thread: hospitals have one
worker each, so two concurrent runs would only queue behind each other on every round."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from services.aggregator.config import RunConfig
from services.aggregator.deps import RunDeps
from services.aggregator.rounds import FederatedRun
from services.aggregator.run_records import ACTIVE

log = logging.getLogger(__name__)


class RunManager:
    def __init__(self, deps: RunDeps) -> None:
        self.deps = deps
        self.store = deps.store
        self.dispatcher = deps.dispatcher  # the API's hospital listing reads it
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._current: FederatedRun | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, resume: bool = True) -> None:
        if resume:
            for rec in sorted(self.store.list(), key=lambda r: r["created"]):
                if rec["status"] in ACTIVE:
                    log.info("resuming run %s after round %s", rec["id"], rec["completed_round"])
                    self._queue.put(rec["id"])
        self._thread = threading.Thread(target=self._loop, name="leukofed-rounds", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            if self._current is not None:
                self._current.stop_requested = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, cfg: RunConfig) -> dict[str, Any]:
        record = self.store.create(cfg.model_dump())
        self._queue.put(record["id"])
        return record

    def cancel(self, run_id: str) -> dict[str, Any] | None:
        with self._lock:
            record = self.store.load(run_id)
            if record is None:
                return None
            if self._current is not None and self._current.record["id"] == run_id:
                self._current.cancel_requested = True
                self._current.record["cancel_requested"] = True
                return {**record, "cancel_requested": True}
            if record["status"] in ACTIVE:
                record.update(status="cancelled", reason="cancelled by request",
                              cancel_requested=True)
                self.store.save(record)
            return record

    def progress(self, run_id: str | None = None) -> dict[str, Any] | None:
        """The step in progress of the running run (``run_id``: only if it is that one):
        round, task, selected, answered, failed, deadline and seconds left; else None."""
        with self._lock:
            run = self._current
        if run is None or (run_id is not None and run.record["id"] != run_id):
            return None
        progress = dict(run.gather.progress)
        if not progress:
            return None
        deadline = progress.get("deadline")
        if isinstance(deadline, int | float):
            progress["seconds_left"] = round(max(0.0, deadline - self.deps.clock()), 1)
        return {"run_id": run.record["id"], **progress}

    def _loop(self) -> None:
        while True:
            run_id = self._queue.get()
            if run_id is None:
                return
            record = self.store.load(run_id)
            if record is None or record["status"] not in ACTIVE:
                continue
            run = FederatedRun(record, self.deps)
            with self._lock:
                self._current = run
            try:
                run.execute()
            finally:
                with self._lock:
                    self._current = None
            if run.stop_requested:
                return
