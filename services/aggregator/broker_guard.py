"""Per-hospital limits on the shared broker (issue 26, finding 9).

Redis ACLs cannot cap how much a user stores: a hospital may write any value up to Redis'
512 MB bulk limit under its own key prefix, and once the broker reaches ``maxmemory`` every
party's writes fail (``noeviction``), the aggregator's task LPUSH included, so one hospital
starves the federation. What is done about it:

* the hospital's ACL (infra/security/gen_acl.py) holds only the commands kombu and Celery
  send, none that makes Redis allocate more than the client sent (SETRANGE/SETBIT with a far
  offset, BITFIELD, APPEND, the *STORE/COPY/SORT copies): every byte a hospital stores
  crossed its own connection first;
* this guard, run by the aggregator in isolated mode (its ACL user already reaches every
  hospital's prefix), measures each hospital's keys every ``interval_s`` (SCAN, then MEMORY
  USAGE with every element counted) and, when one hospital holds more than ``quota_bytes``
  or more than ``max_keys`` keys, deletes that hospital's largest keys until it is under
  both again (UNLINK: freed in Redis' background thread). An honest hospital holds its
  queue, its unacknowledged task, its results (kept an hour) and a few small keys: a few
  model sizes, far under the default quota. Deleted keys of a misbehaving hospital cost only
  that hospital (its queued tasks and answers; the round goes on without it);
* a memory alarm: used memory at or over ``alarm_fraction`` of ``maxmemory`` is logged as a
  warning and exported on /metrics (``leukofed_broker_memory_alarm``), with each hospital's
  bytes and keys and the enforcements, for Prometheus to alert on.

What it does not guarantee: between two checks a hospital can add what its link carries
(``interval_s`` times its bandwidth), so ``maxmemory`` needs that headroom above the sum of
the quotas; memory that is not in keys (client buffers, pub/sub backlogs) is bounded by
Redis' own client limits, not by this guard (docs/security.md).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from leukofed.transport import key_prefix

log = logging.getLogger(__name__)

MAX_KEYS = 10_000  # an honest hospital holds tens (results expire after an hour)
ALARM_FRACTION = 0.8
_BATCH = 500


@dataclass
class HospitalUsage:
    bytes: int = 0
    keys: list[tuple[int, bytes]] = field(default_factory=list)  # (size, key name)


class BrokerGuard:
    """Measures and caps each hospital's share of the broker; see the module docstring.
    ``client``: a redis-py client as the aggregator's ACL user."""

    def __init__(self, client: Any, hospitals: Iterable[str], quota_bytes: int,
                 interval_s: float = 2.0, max_keys: int = MAX_KEYS,
                 alarm_fraction: float = ALARM_FRACTION) -> None:
        self.client = client
        self.prefixes = {key_prefix(h).encode(): h for h in hospitals}
        self.quota_bytes = int(quota_bytes)
        self.max_keys = int(max_keys)
        self.interval_s = float(interval_s)
        self.alarm_fraction = float(alarm_fraction)
        self.usage: dict[str, tuple[int, int]] = {}  # hospital -> (bytes, keys), last check
        self.memory: tuple[int, int] | None = None  # (used_memory, maxmemory), last check
        self.enforced: defaultdict[str, int] = defaultdict(int)
        self.deleted_bytes: defaultdict[str, int] = defaultdict(int)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ measuring

    def measure(self) -> dict[str, HospitalUsage]:
        """Every key under a watched prefix with its size in bytes (all elements counted)."""
        usage = {h: HospitalUsage() for h in self.prefixes.values()}
        batch: list[bytes] = []

        def flush() -> None:
            pipe = self.client.pipeline(transaction=False)
            for key in batch:
                pipe.memory_usage(key, samples=0)
            for key, size in zip(batch, pipe.execute(), strict=True):
                if size is not None:  # expired between SCAN and MEMORY USAGE
                    owner = usage[self.prefixes[key.split(b":", 1)[0] + b":"]]
                    owner.bytes += int(size)
                    owner.keys.append((int(size), key))
            batch.clear()

        for key in self.client.scan_iter(count=1000):
            key = key if isinstance(key, bytes) else str(key).encode()
            if key.split(b":", 1)[0] + b":" in self.prefixes:
                batch.append(key)
                if len(batch) >= _BATCH:
                    flush()
        if batch:
            flush()
        return usage

    # ------------------------------------------------------------ enforcing

    def check(self) -> dict[str, list[bytes]]:
        """One pass: measure, shrink every hospital over its limits, read the memory alarm.
        Returns {hospital: keys deleted} for the hospitals it had to shrink."""
        deleted: dict[str, list[bytes]] = {}
        measured = self.measure()
        for hospital, used in measured.items():
            if used.bytes > self.quota_bytes or len(used.keys) > self.max_keys:
                deleted[hospital] = self._shrink(hospital, used)
        self.usage = {h: (u.bytes, len(u.keys)) for h, u in measured.items()}
        info = self.client.info("memory")
        used_memory, maxmemory = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
        self.memory = (used_memory, maxmemory)
        if self.alarm:
            log.warning("broker memory alarm: %.0f MB used of maxmemory %.0f MB (alarm at "
                        "%.0f%%); by hospital: %s", used_memory / 2**20, maxmemory / 2**20,
                        self.alarm_fraction * 100,
                        {h: f"{b / 2**20:.1f} MB" for h, (b, _) in self.usage.items()})
        return deleted

    def _shrink(self, hospital: str, used: HospitalUsage) -> list[bytes]:
        """Delete the hospital's largest keys until it is within its quota and key cap."""
        total, count = used.bytes, len(used.keys)
        doomed: list[bytes] = []
        for size, key in sorted(used.keys, reverse=True):
            if total <= self.quota_bytes and count <= self.max_keys:
                break
            doomed.append(key)
            total -= size
            count -= 1
        for start in range(0, len(doomed), _BATCH):
            self.client.unlink(*doomed[start:start + _BATCH])
        freed = used.bytes - total
        self.enforced[hospital] += 1
        self.deleted_bytes[hospital] += freed
        log.warning("broker quota: hospital %s held %.1f MB in %d keys (quota %.1f MB, %d "
                    "keys); deleted its %d largest keys (%.1f MB), e.g. %s", hospital,
                    used.bytes / 2**20, len(used.keys), self.quota_bytes / 2**20,
                    self.max_keys, len(doomed), freed / 2**20,
                    [k.decode(errors="replace") for k in doomed[:3]])
        gone = set(doomed)
        used.bytes, used.keys = total, [k for k in used.keys if k[1] not in gone]
        return doomed

    @property
    def alarm(self) -> bool:
        if self.memory is None or not self.memory[1]:
            return False
        return self.memory[0] >= self.alarm_fraction * self.memory[1]

    # ------------------------------------------------------------ running

    def start(self) -> BrokerGuard:
        self._thread = threading.Thread(target=self._run, name="broker-guard", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - a broker outage must not end the guard
                log.warning("broker guard: check failed (retrying in %.0f s): %s: %s",
                            self.interval_s, type(exc).__name__, exc)
            self._stop.wait(self.interval_s)

    # ------------------------------------------------------------ /metrics

    def collect(self) -> Iterator[Metric]:
        """Prometheus collector (registered on the aggregator's /metrics registry)."""
        size = GaugeMetricFamily("leukofed_broker_hospital_bytes", "bytes of a hospital's "
                                 "keys on the broker at the last check", labels=["hospital"])
        keys = GaugeMetricFamily("leukofed_broker_hospital_keys", "number of a hospital's "
                                 "keys on the broker at the last check", labels=["hospital"])
        for hospital, (b, k) in sorted(self.usage.items()):
            size.add_metric([hospital], b)
            keys.add_metric([hospital], k)
        yield size
        yield keys
        yield GaugeMetricFamily("leukofed_broker_hospital_quota_bytes",
                                "most bytes one hospital's keys may hold", value=self.quota_bytes)
        enforced = CounterMetricFamily("leukofed_broker_quota_enforcements", "times a "
                                       "hospital's keys were cut back to its quota",
                                       labels=["hospital"])
        for hospital in sorted(self.prefixes.values()):
            enforced.add_metric([hospital], self.enforced.get(hospital, 0))
        yield enforced
        if self.memory is not None:
            yield GaugeMetricFamily("leukofed_broker_used_memory_bytes",
                                    "Redis used_memory at the last check", value=self.memory[0])
            yield GaugeMetricFamily("leukofed_broker_maxmemory_bytes",
                                    "Redis maxmemory (0: none)", value=self.memory[1])
        yield GaugeMetricFamily("leukofed_broker_memory_alarm", "1 when the broker's used "
                                f"memory is at or over {self.alarm_fraction:.0%} of maxmemory",
                                value=int(self.alarm))
