"""JSON logs with run/round/hospital ids (leukofed.logging) and the aggregator's /metrics."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from fastapi.testclient import TestClient
from test_aggregator_api import FakeManager  # same folder: pytest puts it on sys.path

from leukofed.logging import JsonFormatter, configure, log_context
from services.aggregator.app import create_app
from services.aggregator.config import RunConfig
from services.aggregator.observability import CachedLiveness, RunContextFilter
from services.aggregator.run_records import MAX_EVENTS, RunStore
from services.aggregator.settings import AggregatorSettings


def _capture(service: str, **static: object) -> io.StringIO:
    configure(service, **static)
    buf = io.StringIO()
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_leukofed", False):
            handler.setStream(buf)  # type: ignore[attr-defined]
    return buf


def test_json_lines_carry_static_and_contextual_ids() -> None:
    buf = _capture("client", hospital="a")
    log = logging.getLogger("leukofed.test")
    with log_context(run_id="r1", round=3):
        log.info("fit %s", "done", extra={"bytes": 12})
    log.warning("outside")
    first, second = (json.loads(line) for line in buf.getvalue().splitlines())
    assert first["message"] == "fit done" and first["level"] == "INFO"
    assert (first["service"], first["hospital"], first["run_id"], first["round"]) == (
        "client", "a", "r1", 3)
    assert first["bytes"] == 12 and first["time"].endswith("Z")
    assert "run_id" not in second and second["hospital"] == "a"


def test_exceptions_are_one_json_line() -> None:
    buf = _capture("aggregator")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("x").exception("failed")
    (line,) = buf.getvalue().splitlines()
    assert "ValueError: boom" in json.loads(line)["exception"]


def test_text_format_for_terminals() -> None:
    configure("x", fmt="text")
    record = logging.LogRecord("n", logging.INFO, "", 0, "hello", None, None)
    record.run_id = "r9"
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "_leukofed", False))
    assert handler.format(record).endswith("hello [run_id=r9]")
    assert json.loads(JsonFormatter().format(record))["run_id"] == "r9"


def test_round_loop_lines_get_run_and_round() -> None:
    thread = threading.current_thread()
    manager = SimpleNamespace(_thread=thread,
                              _current=SimpleNamespace(record={"id": "r2", "current_round": 4}))
    record = logging.LogRecord("n", logging.INFO, "", 0, "m", None, None)
    assert RunContextFilter(manager).filter(record)
    assert (record.run_id, record.round) == ("r2", 4)
    other = logging.LogRecord("n", logging.INFO, "", 0, "m", None, None)
    other.thread = -1  # another thread (an HTTP request): left alone
    RunContextFilter(manager).filter(other)
    assert not hasattr(other, "run_id")


def test_metrics_from_run_records(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    rec = store.create(RunConfig(strategy="fedadam").model_dump())
    rec["status"] = "completed"
    rec["rounds"] = [{"participants": {"a": 10, "b": 5}, "timings": {"round_s": 42.0}},
                     {"participants": {"a": 10}, "timings": {"round_s": 3.0}}]
    store.event(rec, "rejected", round=2, hospital="b", rejected="nan")
    store.event(rec, "other", round=2)
    for i in range(MAX_EVENTS + 10):  # the event log is capped; the counter is not
        store.event(rec, f"rejected {i}", round=3, hospital="c", rejected="wire: bad")
    store.save(rec)
    settings = AggregatorSettings(state_dir=tmp_path, tracking=False)
    with TestClient(create_app(settings, FakeManager(store))) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    text = response.text
    assert 'leukofed_rounds_completed_total{strategy="fedadam"} 2.0' in text
    assert 'leukofed_updates_accepted_total{hospital="a"} 2.0' in text
    assert 'leukofed_updates_rejected_total{hospital="b",reason="nan"} 1.0' in text
    assert f'leukofed_updates_rejected_total{{hospital="c",reason="wire"}} ' \
        f'{float(MAX_EVENTS + 10)}' in text
    assert 'leukofed_round_duration_seconds_bucket{le="5.0"} 1.0' in text
    assert 'leukofed_round_duration_seconds_count 2.0' in text
    assert 'leukofed_runs{status="completed"} 1.0' in text
    assert "leukofed_hospitals_alive 1.0" in text  # FakeDispatcher: hospital a is live


class CountingDispatcher:
    """A dispatcher whose liveness ping reaches every hospital's worker: counted."""

    last_seen: dict[str, float] = {}

    def __init__(self) -> None:
        self.pings = 0

    def live_hospitals(self) -> set[str]:
        self.pings += 1
        return {"a", "b"}


def test_attack_metrics_scrape_amplification(tmp_path: Path) -> None:
    """Issue 26, finding 11: /metrics is open (for probes) and every scrape pinged every
    hospital, so anyone reaching the port turned a scrape storm into a ping storm on the
    broker and the workers. Liveness is now cached: 200 scrapes inside the window send one
    ping, and each still reports the hospitals alive."""
    manager = FakeManager(RunStore(tmp_path))
    manager.dispatcher = CountingDispatcher()  # type: ignore[assignment]
    settings = AggregatorSettings(state_dir=tmp_path, tracking=False,
                                  metrics_liveness_max_age_s=600.0)
    with TestClient(create_app(settings, manager)) as client:
        for _ in range(200):
            response = client.get("/metrics")
            assert response.status_code == 200
            assert "leukofed_hospitals_alive 2.0" in response.text
    assert manager.dispatcher.pings == 1


def test_cached_liveness_refreshes_after_its_age_and_pings_once_for_concurrent_scrapes(
) -> None:
    now = [0.0]
    release = threading.Event()
    calls: list[float] = []

    def ping() -> set[str]:
        calls.append(now[0])
        release.wait(5)  # a slow ping: the workers take ping_timeout_s to answer
        return {"a"}

    live = CachedLiveness(ping, 15.0, clock=lambda: now[0])
    release.set()
    assert live() == {"a"} and len(calls) == 1
    now[0] = 14.9
    assert live() == {"a"} and len(calls) == 1
    now[0] = 15.0  # stale: the next scrape pings again ...
    release.clear()
    first = threading.Thread(target=live)
    first.start()
    while len(calls) < 2:
        time.sleep(0.01)
    # ... and scrapes that arrive meanwhile get the last answer at once, without a ping.
    answers = [live() for _ in range(50)]
    release.set()
    first.join(5)
    assert answers == [{"a"}] * 50 and len(calls) == 2 and live.pings == 2

    def broken() -> set[str]:
        raise ConnectionError("broker gone")

    failing = CachedLiveness(broken, 15.0, clock=lambda: now[0])
    assert failing() is None and failing() is None and failing.pings == 1
