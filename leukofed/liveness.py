"""Worker heartbeats: how the aggregator notices within seconds that a hospital's worker died.

Celery's own liveness signal (a remote-control ping) cannot tell a dead worker from a busy
one: a solo-pool worker that is training does not answer pings, so without heartbeats a
round with a dead hospital waits for its deadline. Each worker process therefore runs a
small thread that refreshes one Redis key per hospital it serves, with a time-to-live; a
worker that is killed stops refreshing and its key expires within ``ttl_s``. Training keeps
the thread alive (TensorFlow releases the GIL), and a paused hospital is still alive.

The key sits under the hospital's own prefix (``<id>:``), so a hospital under per-hospital
ACL isolation (infra/security/gen_acl.py) may write it, and no hospital can write another's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from leukofed.transport import key_prefix

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 3.0
# Gone after this long without a refresh: several missed beats, so a busy Redis or a long
# garbage collection is not a death, and still well under the 30 s the issue asks for.
HEARTBEAT_TTL_S = 12.0


def heartbeat_key(hospital_id: str) -> str:
    return key_prefix(hospital_id) + "leukofed.alive"


def beat(client: Any, hospitals: Iterable[str], ttl_s: float = HEARTBEAT_TTL_S) -> None:
    """One refresh: each hospital's key holds the worker's wall time and expires in ttl_s."""
    now = f"{time.time():.3f}"
    pipe = client.pipeline(transaction=False)
    for h in hospitals:
        pipe.set(heartbeat_key(h), now, px=int(ttl_s * 1000))
    pipe.execute()


def read_heartbeats(client: Any, hospitals: list[str]) -> dict[str, float | None]:
    """{hospital: time of its last beat, or None when its key expired or never existed}."""
    if not hospitals:
        return {}
    values = client.mget([heartbeat_key(h) for h in hospitals])
    out: dict[str, float | None] = {}
    for h, value in zip(hospitals, values, strict=True):
        try:
            out[h] = float(value) if value is not None else None
        except (TypeError, ValueError):
            out[h] = None
    return out


class Heartbeat(threading.Thread):
    """Refreshes the heartbeat keys of ``hospitals`` every ``interval_s`` until stopped.
    ``client_factory`` makes the Redis client in this thread (Celery's backends are
    thread-local). A failed beat (Redis restarting) is logged and retried next time."""

    def __init__(self, client_factory: Callable[[], Any], hospitals: Iterable[str],
                 interval_s: float = HEARTBEAT_INTERVAL_S, ttl_s: float = HEARTBEAT_TTL_S
                 ) -> None:
        super().__init__(name="leukofed-heartbeat", daemon=True)
        self.client_factory = client_factory
        self.hospitals = sorted(hospitals)
        self.interval_s, self.ttl_s = interval_s, ttl_s
        self.stopped = threading.Event()

    def run(self) -> None:
        client = None
        while not self.stopped.is_set():
            try:
                client = client or self.client_factory()
                beat(client, self.hospitals, self.ttl_s)
            except Exception as exc:  # the broker is down: the next beat retries
                log.warning("heartbeat for %s failed: %s", self.hospitals[:3], exc)
                client = None
            self.stopped.wait(self.interval_s)

    def stop(self) -> None:
        self.stopped.set()
