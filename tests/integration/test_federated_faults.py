"""Faults of real hospitals and infrastructure, with real redis-server and Celery workers:
a worker killed mid-round, an unreachable quorum, a paused hospital, bad updates, a redis
restart. The aggregator runs in-process here (its FastAPI app through TestClient, MLflow off)
to keep the suite fast; test_federated_restart.py runs it under uvicorn."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from fedstack import TINY, Worker, finished, wait_log, wait_run

pytestmark = pytest.mark.integration


@contextmanager
def aggregator(tmp_path: Path, broker_url: str) -> Iterator[TestClient]:
    from services.aggregator.app import create_app
    from services.aggregator.settings import AggregatorSettings

    settings = AggregatorSettings(broker_url=broker_url, state_dir=tmp_path / "agg",
                                  cache_dir=tmp_path / "cache", tracking=False,
                                  poll_interval_s=0.1, ping_timeout_s=0.5)
    with TestClient(create_app(settings)) as client:
        yield client


def run_to_end(client: TestClient, config: dict, timeout: float) -> dict:
    response = client.post("/v1/runs", json={**TINY, **config})
    assert response.status_code == 201, response.text
    run_id = response.json()["id"]
    return wait_run(lambda: client.get(f"/v1/runs/{run_id}").json(), finished, timeout)


def messages(run: dict) -> list[str]:
    return [e["message"] for e in run["events"]]


def test_worker_killed_mid_round_then_quorum_unreachable(tmp_path: Path, redis_server) -> None:
    a = Worker.in_tmp(tmp_path, "a", redis_server.url).start()
    # b stalls inside fit, so it is certainly mid-round when killed.
    b = Worker.in_tmp(tmp_path, "b", redis_server.url,
                      {"LEUKOFED_DRILL_DELAY_S": "120"}).start()
    try:
        a.wait_ready()
        b.wait_ready()
        with aggregator(tmp_path, redis_server.url) as client:
            response = client.post("/v1/runs", json={
                **TINY, "rounds": 2, "hospitals": ["a", "b"], "min_fit_clients": 1,
                "round_deadline_s": 150, "max_round_retries": 0})
            run_id = response.json()["id"]
            wait_log(b.log_path, "Task leukofed.client.fit[", 60, b.proc)
            time.sleep(1.0)
            b.kill()
            run = wait_run(lambda: client.get(f"/v1/runs/{run_id}").json(), finished, 150)
            assert run["status"] == "completed", run["reason"]
            first, second = run["history"]
            assert first["participants"].keys() == {"a"}
            # Noticed by its heartbeat stopping, well before the deadline.
            assert first["failed"]["b"].startswith("worker lost: no heartbeat"), first
            assert first["timings"]["round_s"] < 100, first["timings"]
            assert second["selected"] == ["a"]  # b is not live any more

            # Quorum of 2 with one hospital dead: fails with a reason, does not hang.
            started = time.monotonic()
            run = run_to_end(client, {"rounds": 2, "hospitals": ["a", "b"],
                                      "min_fit_clients": 2, "round_deadline_s": 4,
                                      "max_round_retries": 1}, 60)
            assert run["status"] == "failed"
            assert "quorum not reached after 2 attempts" in run["reason"]
            assert "b" in run["reason"] and "no answer by the deadline" in run["reason"]
            assert time.monotonic() - started < 40

            # A paused hospital declines with a clear status.
            from services.client.audit import PauseSwitch

            PauseSwitch(tmp_path / "state-a").pause("maintenance")
            run = run_to_end(client, {"rounds": 1, "hospitals": ["a"], "round_deadline_s": 20,
                                      "max_round_retries": 0}, 60)
            assert run["status"] == "failed"
            assert "declined: paused" in run["reason"]
            PauseSwitch(tmp_path / "state-a").resume()
    finally:
        a.stop()
        b.stop()


def test_bad_updates_rejected_round_goes_on(tmp_path: Path, redis_server) -> None:
    honest = Worker.in_tmp(tmp_path, "a", redis_server.url).start()
    byzantine = Worker.in_tmp(tmp_path, "b", redis_server.url,
                              {"LEUKOFED_DRILL_FAULT": "nan,shape,norm"}).start()
    try:
        honest.wait_ready()
        byzantine.wait_ready()
        with aggregator(tmp_path, redis_server.url) as client:
            run = run_to_end(client, {"rounds": 3, "hospitals": ["a", "b"],
                                      "min_fit_clients": 1, "round_deadline_s": 90}, 240)
    finally:
        honest.stop()
        byzantine.stop()
    assert run["status"] == "completed", run["reason"]
    reasons = [r["rejected"]["b"].split(":")[0] for r in run["history"]]
    assert reasons == ["non_finite", "shape", "norm"]
    assert all(set(r["participants"]) == {"a"} for r in run["history"])
    assert sum("update from b rejected" in m for m in messages(run)) == 3
    for r in run["history"]:
        assert r["global"]["test_accuracy"] == r["global"]["test_accuracy"]  # not NaN


def test_redis_restart_mid_run(tmp_path: Path, redis_server) -> None:
    workers = [Worker.in_tmp(tmp_path, h, redis_server.url,
                             {"LEUKOFED_DRILL_DELAY_S": "2"}).start() for h in ("a", "b")]
    try:
        for w in workers:
            w.wait_ready()
        with aggregator(tmp_path, redis_server.url) as client:
            response = client.post("/v1/runs", json={
                **TINY, "rounds": 3, "hospitals": ["a", "b"], "min_fit_clients": 1,
                "round_deadline_s": 60, "max_round_retries": 2})
            run_id = response.json()["id"]
            wait_run(lambda: client.get(f"/v1/runs/{run_id}").json(),
                     lambda r: r["current_round"] >= 2, 120)
            redis_server.restart(downtime=2.0)
            run = wait_run(lambda: client.get(f"/v1/runs/{run_id}").json(), finished, 180)
    finally:
        for w in workers:
            w.stop()
    assert run["status"] == "completed", run["reason"]
    assert [r["round"] for r in run["history"]] == [1, 2, 3]
