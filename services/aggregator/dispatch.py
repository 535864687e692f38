"""Sending tasks to hospitals over Celery, and knowing who is live.

Two modes. Shared: one Celery app for every hospital (queues ``hospital.<id>``). Isolated
(``hospital_app`` given): one app per hospital, each with that hospital's key prefix
(``make_celery(isolate=True)``), because with per-hospital Redis ACLs a hospital's worker
sees only keys and channels under ``<id>:``; tasks, results and remote-control replies for
hospital X then only exist under X's prefix and must go through X's app.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Celery, states
from celery.result import AsyncResult

from leukofed import signing
from leukofed.liveness import read_heartbeats
from leukofed.protocol import RoundConfig, WireAnswer, WireMap
from leukofed.transport import (
    GLOBAL_BLOB_PREFIX,
    SHARED_BLOB_MIN_BYTES,
    TASK_DESCRIBE,
    hospital_of_queue,
    queue_name,
)

log = logging.getLogger(__name__)


class CeleryDispatcher:
    def __init__(self, app: Celery | None, ping_timeout_s: float = 1.0,
                 signing_key: signing.Ed25519PrivateKey | None = None,
                 hospital_app: Callable[[str], Celery] | None = None,
                 hospitals: Iterable[str] = ()) -> None:
        if (app is None) == (hospital_app is None):
            raise ValueError("give either one shared app or hospital_app (isolated mode)")
        self.app = app
        self._hospital_app = hospital_app
        self._apps: dict[str, Celery] = {}
        self.signing_key = signing_key  # when set, every task carries the aggregator's signature
        self.ping_timeout_s = ping_timeout_s
        self.last_seen: dict[str, float] = {}
        self.describes: dict[str, WireAnswer] = {}
        # task id -> the hospital it was sent to: an answer shows that hospital alive, not
        # whichever one the answer names (unsigned, and in isolated mode a hospital's own
        # worker writes it: it could make another look live).
        self._sent_to: dict[str, str] = {}
        self._lock = threading.Lock()
        for h in hospitals:
            self.app_for(h)

    @property
    def isolated(self) -> bool:
        return self._hospital_app is not None

    def app_for(self, hospital: str) -> Celery:
        """The app that reaches ``hospital``: the shared one, or its own (made on first use,
        so a run may name a hospital the settings did not list)."""
        if self._hospital_app is None:
            assert self.app is not None
            return self.app
        with self._lock:
            if hospital not in self._apps:
                self._apps[hospital] = self._hospital_app(hospital)
            return self._apps[hospital]

    def seen(self, hospital: str) -> None:
        with self._lock:
            self.last_seen[hospital] = time.time()

    def live_hospitals(self) -> set[str] | None:
        """Hospitals whose worker answered now, from the queues each worker consumes. A
        worker busy training (solo pool) cannot answer; None means the broker is unreachable."""
        if self.isolated:
            with self._lock:
                apps = dict(self._apps)
            if not apps:
                return set()
            # One broadcast per hospital prefix, in parallel: each waits the full timeout.
            with ThreadPoolExecutor(len(apps)) as pool:
                answers = dict(zip(apps, pool.map(self._active_queues, apps.values()),
                                   strict=True))
            if all(a is None for a in answers.values()):
                return None
            # A worker under hospital X's prefix counts only for X, whatever queues it
            # claims: one hospital cannot make another look live.
            live = {h for h, answer in answers.items() if h in self._live_in(answer or {})}
        else:
            assert self.app is not None
            answer = self._active_queues(self.app)
            if answer is None:
                return None
            live = self._live_in(answer)
        for hospital in live:
            self.seen(hospital)
        return live

    def heartbeats(self, hospitals: list[str]) -> dict[str, float | None]:
        """Each hospital's last worker heartbeat (leukofed.liveness), None when gone."""
        if self.isolated:  # each through its own prefix's connection
            beats = {}
            for h in hospitals:
                beats.update(read_heartbeats(self.app_for(h).backend.client, [h]))
        else:
            assert self.app is not None
            beats = read_heartbeats(self.app.backend.client, hospitals)
        with self._lock:
            for h, seen in beats.items():
                if seen is not None:
                    self.last_seen[h] = max(self.last_seen.get(h, 0.0), seen)
        return beats

    def _live_in(self, replies: dict[str, object]) -> set[str]:
        live = set()
        for queues in replies.values():
            for q in queues or ():
                hospital = hospital_of_queue(q.get("name", ""))
                if hospital:
                    live.add(hospital)
        return live

    def _active_queues(self, app: Celery) -> dict[str, object] | None:
        try:
            return app.control.inspect(timeout=self.ping_timeout_s).active_queues() or {}
        except Exception as exc:
            log.warning("cannot reach workers: %s", exc)
            return None

    def submit(self, hospital: str, task: str, args: list[Any], expires: float) -> AsyncResult:
        # expires: a message still queued after the round deadline (a worker that was down)
        # is dropped by Celery instead of training on a stale model.
        app = self.app_for(hospital)
        # The signature is over the real arguments whatever way the weights travel.
        kwargs, sent = self._auth(task, hospital, args), args
        blob = args[0] if args else None
        if (not self.isolated and isinstance(blob, bytes)
                and len(blob) >= SHARED_BLOB_MIN_BYTES):
            kwargs["global_ref"] = _share_blob(app, blob, expires)
            sent = [b"", *args[1:]]
        handle = app.send_task(
            task, args=sent, kwargs=kwargs,
            queue=queue_name(hospital), expires=max(1.0, expires - time.time()) + 30.0)
        _unsubscribe(app, handle.id)
        with self._lock:
            self._sent_to[handle.id] = hospital
            while len(self._sent_to) > 100_000:  # handles never discarded (a crashed run)
                self._sent_to.pop(next(iter(self._sent_to)))
        return handle

    def _auth(self, task: str, hospital: str, args: list[Any]) -> WireMap:
        if self.signing_key is None:
            return {}
        return {"auth": signing.sign_task(self.signing_key, task, hospital, args)}

    def poll(self, handle: AsyncResult) -> tuple[bool, WireAnswer | None, str | None]:
        state = handle.state
        if state not in states.READY_STATES:
            return False, None, None
        if state == states.SUCCESS:
            with self._lock:
                hospital = self._sent_to.get(handle.id)
            if hospital is not None:
                self.seen(hospital)
            return True, handle.result, None
        return True, None, f"{state}: {handle.result!r}"[:500]

    def discard(self, handle: AsyncResult) -> None:
        with self._lock:
            self._sent_to.pop(handle.id, None)
        try:
            handle.forget()  # results hold weight blobs: do not leave them in Redis
        except Exception as exc:
            log.debug("forget %s: %s", handle.id, exc)

    def describe(self, hospitals: list[str], timeout_s: float = 3.0) -> dict[str, WireAnswer]:
        """Ask live hospitals for their class counts and fingerprint, for the hospital list
        (cached). Display only: a run asks afresh and verifies (gather.Gather.declare)."""
        expires = time.time() + timeout_s
        config = RoundConfig.build(deadline=expires)
        handles = {h: self.submit(h, TASK_DESCRIBE, [b"", config], expires)
                   for h in hospitals}
        while handles and time.time() < expires:
            for h, handle in list(handles.items()):
                done, result, _ = self.poll(handle)
                if done:
                    handles.pop(h)
                    self.discard(handle)
                    if isinstance(result, dict) and result.get("status") == "ok":
                        self.describes[h] = {**result, "time": time.time()}
            time.sleep(0.1)
        return self.describes


def _share_blob(app: Celery, blob: bytes, expires: float) -> str:
    """Store ``blob`` once under its digest until after ``expires`` (workers fetch it,
    services/client/worker.py); checked on every send, so a broker that restarted without
    it gets it again. Isolated mode never shares: a hospital reads only its own keys."""
    digest = hashlib.sha256(blob).hexdigest()
    key = GLOBAL_BLOB_PREFIX + digest
    ttl_ms = int((max(1.0, expires - time.time()) + 120.0) * 1000)
    client = app.backend.client
    if client.exists(key):
        client.pexpire(key, ttl_ms)
    else:
        client.set(key, blob, px=ttl_ms)
    return digest


def _unsubscribe(app: Celery, task_id: str) -> None:
    """We poll results (and forget each once read) and never block on one, so Celery's
    Redis backend must not stay SUBSCRIBEd to the task's result channel: nobody drains
    those messages outside AsyncResult.get(), and each published result (a whole weight
    update) would wait in Redis's output buffer for this client, counted in Redis's memory,
    for every hospital of the round at once."""
    consumer = getattr(app.backend, "result_consumer", None)
    if consumer is not None:
        try:
            consumer.cancel_for(task_id)
        except Exception as exc:  # the subscription dies with its connection anyway
            log.debug("unsubscribe %s: %s", task_id, exc)
