"""Sending tasks to hospitals over Celery, and knowing who is live."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Celery, states
from celery.result import AsyncResult

from leukofed import signing
from leukofed.transport import TASK_DESCRIBE, hospital_of_queue, queue_name

log = logging.getLogger(__name__)


class CeleryDispatcher:
    def __init__(self, app: Celery, ping_timeout_s: float = 1.0,
                 signing_key: signing.Ed25519PrivateKey | None = None) -> None:
        self.app = app
        self.signing_key = signing_key  # when set, every task carries the aggregator's signature
        self.ping_timeout_s = ping_timeout_s
        self.last_seen: dict[str, float] = {}
        self.describes: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def seen(self, hospital: str) -> None:
        with self._lock:
            self.last_seen[hospital] = time.time()

    def live_hospitals(self) -> set[str] | None:
        """Hospitals whose worker answered now, from the queues each worker consumes. A
        worker busy training (solo pool) cannot answer; None means the broker is unreachable."""
        try:
            replies = self.app.control.inspect(timeout=self.ping_timeout_s).active_queues()
        except Exception as exc:
            log.warning("cannot reach workers: %s", exc)
            return None
        live = set()
        for queues in (replies or {}).values():
            for q in queues or ():
                hospital = hospital_of_queue(q.get("name", ""))
                if hospital:
                    live.add(hospital)
                    self.seen(hospital)
        return live

    def submit(self, hospital: str, task: str, args: list[Any], expires: float) -> AsyncResult:
        # expires: a message still queued after the round deadline (a worker that was down)
        # is dropped by Celery instead of training on a stale model.
        return self.app.send_task(task, args=args, kwargs=self._auth(task, hospital, args),
                                  queue=queue_name(hospital),
                                  expires=max(1.0, expires - time.time()) + 30.0)

    def _auth(self, task: str, hospital: str, args: list[Any]) -> dict[str, Any]:
        if self.signing_key is None:
            return {}
        return {"auth": signing.sign_task(self.signing_key, task, hospital, args)}

    def poll(self, handle: AsyncResult) -> tuple[bool, dict[str, Any] | None, str | None]:
        state = handle.state
        if state not in states.READY_STATES:
            return False, None, None
        if state == states.SUCCESS:
            result = handle.result
            if isinstance(result, dict) and isinstance(result.get("hospital"), str):
                self.seen(result["hospital"])
            return True, result, None
        return True, None, f"{state}: {handle.result!r}"[:500]

    def discard(self, handle: AsyncResult) -> None:
        try:
            handle.forget()  # results hold weight blobs: do not leave them in Redis
        except Exception as exc:
            log.debug("forget %s: %s", handle.id, exc)

    def describe(self, hospitals: list[str], timeout_s: float = 3.0) -> dict[str, dict[str, Any]]:
        """Ask live hospitals for their class counts and fingerprint (cached)."""
        handles = {h: self.app.send_task(TASK_DESCRIBE, kwargs=self._auth(TASK_DESCRIBE, h, []),
                                         queue=queue_name(h),
                                         expires=timeout_s + 30) for h in hospitals}
        deadline = time.time() + timeout_s
        while handles and time.time() < deadline:
            for h, handle in list(handles.items()):
                done, result, _ = self.poll(handle)
                if done:
                    handles.pop(h)
                    self.discard(handle)
                    if isinstance(result, dict) and result.get("status") == "ok":
                        self.describes[h] = {**result, "time": time.time()}
            time.sleep(0.1)
        return self.describes
