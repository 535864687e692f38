"""Prometheus metrics and log context of the aggregator, without touching the round loop.

Metrics are derived at scrape time from the run records the round loop already persists
(``<state_dir>/runs/*/run.json``): rounds completed and their durations (the summaries),
updates accepted (the participants) and rejected by reason (the rejection events). So they
survive an aggregator restart, as the runs themselves do, and cannot drift from what the API
reports. Hospitals alive is a ping of the workers, at most one per
``metrics_liveness_max_age_s`` (``CachedLiveness``): /metrics is open to anyone who can reach
the port, and pinging every hospital on each scrape let a scrape storm become a ping storm.

Log context: the runs execute one at a time on the manager's thread, so a logging filter can
tag every line of that thread with the current run id and round number.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

# Rounds last from seconds (tiny test models) to hours (large models on CPUs).
ROUND_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
                 7200.0, 14400.0)


def _reason_code(reason: Any) -> str:
    # Only the reason's code ("nan", "shape", "norm", "wire"...), never its free text: label
    # values must stay few, or the number of Prometheus series grows without bound.
    return str(reason).split(":")[0].strip()[:32] or "unknown"


class CachedLiveness:
    """The hospitals alive as /metrics reports them: at most one ping of the workers per
    ``max_age_s``, however many scrapes arrive. Scrapes in between get the last answer;
    while one scrape pings, the others get the last answer at once rather than queue (only
    the very first scrape waits, having nothing to show)."""

    def __init__(self, ping: Callable[[], set[str] | None], max_age_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ping, self.max_age_s, self.clock = ping, float(max_age_s), clock
        self.pings = 0
        self._lock = threading.Lock()
        self._answer: set[str] | None = None
        self._at: float | None = None

    def _fresh(self) -> bool:
        return self._at is not None and self.clock() - self._at < self.max_age_s

    def __call__(self) -> set[str] | None:
        if not self._fresh() and self._lock.acquire(blocking=self._at is None):
            try:
                if not self._fresh():  # another scrape may have refreshed it meanwhile
                    self.pings += 1
                    try:
                        self._answer = self.ping()
                    except Exception:  # noqa: BLE001 - reported as unreachable, not a 500
                        logging.getLogger(__name__).exception("liveness ping failed")
                        self._answer = None
                    self._at = self.clock()
            finally:
                self._lock.release()
        return None if self._answer is None else set(self._answer)


class RunRecordCollector:
    """Reads the run records on each scrape (cached by file modification time)."""

    def __init__(self, state_dir: Path,
                 live_hospitals: Callable[[], set[str] | None] | None = None,
                 liveness_max_age_s: float = 15.0) -> None:
        self.runs_dir = Path(state_dir) / "runs"
        self.liveness_max_age_s = liveness_max_age_s
        self.live_hospitals = live_hospitals
        # Set by the app: the running step's progress (RunManager.progress) and each
        # hospital's last sign of life (answer or heartbeat, CeleryDispatcher.last_seen).
        self.progress: Callable[[], dict[str, Any] | None] | None = None
        self.last_seen: Callable[[], dict[str, float]] | None = None
        self._cache: dict[Path, tuple[float, dict[str, Any]]] = {}

    @property
    def live_hospitals(self) -> CachedLiveness | None:
        return self._liveness

    @live_hospitals.setter
    def live_hospitals(self, ping: Callable[[], set[str] | None] | None) -> None:
        # Whatever pings the workers is wrapped here, so no caller can forget the cache.
        self._liveness = None if ping is None else CachedLiveness(ping,
                                                                  self.liveness_max_age_s)

    def _records(self) -> list[dict[str, Any]]:
        import json

        out = []
        paths = sorted(self.runs_dir.glob("*/run.json")) if self.runs_dir.is_dir() else []
        for path in paths:
            try:
                mtime = path.stat().st_mtime
                cached = self._cache.get(path)
                if cached is None or cached[0] != mtime:
                    cached = (mtime, json.loads(path.read_text()))
                    self._cache[path] = cached
                out.append(cached[1])
            except (OSError, ValueError):  # being replaced right now: next scrape reads it
                continue
        return out

    def _live_metrics(self) -> Iterable[Metric]:
        if self.progress is not None:
            yield from _progress_metrics(self.progress())
        if self.last_seen is not None:
            import time

            now = time.time()
            gauge = GaugeMetricFamily("leukofed_hospital_last_seen_seconds",
                                      "Seconds since each hospital's last heartbeat or answer",
                                      labels=["hospital"])
            for hospital, seen in sorted(self.last_seen().items()):
                gauge.add_metric([hospital], round(max(0.0, now - seen), 1))
            yield gauge

    def collect(self) -> Iterable[Metric]:
        records = self._records()
        rounds = CounterMetricFamily("leukofed_rounds_completed",
                                     "Federated rounds completed (aggregated, checkpointed)",
                                     labels=["strategy"])
        accepted = CounterMetricFamily("leukofed_updates_accepted",
                                       "Hospital updates aggregated", labels=["hospital"])
        rejected = CounterMetricFamily("leukofed_updates_rejected",
                                       "Hospital updates rejected by validation, by reason",
                                       labels=["hospital", "reason"])
        runs = GaugeMetricFamily("leukofed_runs", "Federated runs by status",
                                 labels=["status"])
        current = GaugeMetricFamily("leukofed_current_round",
                                    "Round in progress of the running run (0: none)")
        by_strategy: dict[str, int] = {}
        by_hospital: dict[str, int] = {}
        by_reason: dict[tuple[str, str], int] = {}
        by_status: dict[str, int] = {}
        durations: list[float] = []
        running_round = 0
        for rec in records:
            strategy = str(rec.get("config", {}).get("strategy", "unknown"))
            by_status[rec.get("status", "unknown")] = by_status.get(rec.get("status"), 0) + 1
            if rec.get("status") == "running":
                running_round = int(rec.get("current_round") or 0)
            for summary in rec.get("rounds", []):
                by_strategy[strategy] = by_strategy.get(strategy, 0) + 1
                seconds = summary.get("timings", {}).get("round_s")
                if isinstance(seconds, int | float):
                    durations.append(float(seconds))
                for hospital in summary.get("participants", {}):
                    by_hospital[hospital] = by_hospital.get(hospital, 0) + 1
            for hospital, reasons in rec.get("rejections", {}).items():
                for reason, n in reasons.items():
                    key = (str(hospital), _reason_code(reason))
                    by_reason[key] = by_reason.get(key, 0) + int(n)
        for strategy, n in sorted(by_strategy.items()):
            rounds.add_metric([strategy], n)
        for hospital, n in sorted(by_hospital.items()):
            accepted.add_metric([hospital], n)
        for (hospital, reason), n in sorted(by_reason.items()):
            rejected.add_metric([hospital, reason], n)
        for status, n in sorted(by_status.items()):
            runs.add_metric([str(status)], n)
        current.add_metric([], running_round)
        yield from (rounds, accepted, rejected, runs, current,
                    _histogram("leukofed_round_duration_seconds",
                               "Wall time of completed rounds, selection to checkpoint",
                               durations))
        yield from self._live_metrics()
        if self.live_hospitals is not None:
            live = self.live_hospitals()
            alive = GaugeMetricFamily("leukofed_hospitals_alive",
                                      "Hospitals whose worker answered the last ping (at most "
                                      "metrics_liveness_max_age_s old; 0 when the broker is "
                                      "unreachable)")
            alive.add_metric([], len(live) if live is not None else 0)
            yield alive


def _progress_metrics(progress: dict[str, Any] | None) -> Iterable[Metric]:
    p = progress or {}
    for key, doc in (("selected", "Hospitals asked in the step in progress (0: none)"),
                     ("answered", "Hospitals that answered in the step in progress"),
                     ("failed", "Hospitals that failed or were lost in the step in progress"),
                     ("seconds_left", "Seconds to the deadline of the step in progress")):
        gauge = GaugeMetricFamily(f"leukofed_round_{key}", doc)
        gauge.add_metric([], float(p.get(key) or 0))
        yield gauge


def _histogram(name: str, documentation: str, values: list[float]) -> HistogramMetricFamily:
    buckets = [(str(b), sum(v <= b for v in values)) for b in ROUND_BUCKETS]
    buckets.append(("+Inf", len(values)))
    hist = HistogramMetricFamily(name, documentation)
    hist.add_metric([], buckets, sum_value=sum(values))
    return hist


class AggregatorMetrics:
    """One registry per app (tests build many apps in one process)."""

    def __init__(self, state_dir: Path,
                 live_hospitals: Callable[[], set[str] | None] | None = None,
                 liveness_max_age_s: float = 15.0) -> None:
        self.registry = CollectorRegistry()
        self.collector = RunRecordCollector(state_dir, live_hospitals, liveness_max_age_s)
        self.registry.register(self.collector)  # type: ignore[arg-type]

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RunContextFilter(logging.Filter):
    """Adds run_id and round to every record logged by the thread that executes runs."""

    def __init__(self, manager: Any) -> None:
        super().__init__()
        self.manager = manager  # services.aggregator.manager.RunManager (or a test fake)

    def filter(self, record: logging.LogRecord) -> bool:
        thread = getattr(self.manager, "_thread", None)
        current = getattr(self.manager, "_current", None)
        if thread is not None and current is not None and record.thread == thread.ident:
            run = current.record
            if not hasattr(record, "run_id"):
                record.run_id = run.get("id")
            if not hasattr(record, "round") and run.get("current_round"):
                record.round = run["current_round"]
        return True
