"""A full federated round with per-hospital isolation on, on a real redis-server configured
with the generated ACL file (infra/security/gen_acl.py): hospitals a and b run real Celery
workers as their own ACL users with LEUKOFED_CLIENT_ISOLATE=true, the aggregator holds one
connection per hospital prefix (LEUKOFED_AGGREGATOR_ISOLATED_HOSPITALS), the round completes
with both, every key the round left in Redis lies under a hospital's prefix, and hospital a's
credentials still get NOPERM on b's queue, results, unacked and channels."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from fedstack import TINY, Worker, acl_redis_server, finished, wait_live, wait_run

pytestmark = pytest.mark.integration

AUDITOR = "auditor-only-in-this-test"  # reads every key name; not part of gen_acl's output


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    with acl_redis_server(tmp_path, ["a", "b"],
                          (f"user auditor on >{AUDITOR} ~* &* +@all",)) as server:
        yield server


def url(user: str, password: str, port: int) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{port}/0"


def test_full_round_with_isolation_while_a_cannot_touch_b(acl_redis, tmp_path: Path) -> None:
    from services.aggregator.app import create_app
    from services.aggregator.settings import AggregatorSettings

    port, pw = acl_redis
    workers = [Worker.in_tmp(tmp_path, h, url(h, pw[h], port), {"LEUKOFED_CLIENT_ISOLATE": "true"},
                             per_class=4).start() for h in ("a", "b")]
    auditor = redis.Redis(port=port, username="auditor", password=AUDITOR)
    try:
        for w in workers:
            w.wait_ready()
        settings = AggregatorSettings(
            broker_url=url("aggregator", pw["aggregator"], port), isolated_hospitals="a,b",
            state_dir=tmp_path / "agg", cache_dir=tmp_path / "cache", tracking=False,
            poll_interval_s=0.1, ping_timeout_s=1.0)
        with TestClient(create_app(settings)) as client:
            assert wait_live(client.app.state.dispatcher, {"a", "b"}) == {"a", "b"}
            response = client.post("/v1/runs", json={
                **TINY, "rounds": 1, "hospitals": ["a", "b"], "min_fit_clients": 2,
                "round_deadline_s": 120, "max_round_retries": 0})
            assert response.status_code == 201, response.text
            run_id = response.json()["id"]
            run = wait_run(lambda: client.get(f"/v1/runs/{run_id}").json(), finished, 300)
            # While the workers are still connected: what lies in Redis, and what can a do?
            keys = sorted(k.decode() for k in auditor.scan_iter(count=1000))
            channels = sorted(c.decode() for c in auditor.pubsub_channels())
            patterns = auditor.pubsub_numpat()  # kombu's PSUBSCRIBEs (remote control)
            # Before the attempts below: the honest round as the hospitals' ACL users (an
            # exact command allowlist, gen_acl.HOSPITAL_COMMANDS) was refused nothing.
            refusals = auditor.acl_log(count=100)
            # The broker guard (per-hospital quota, memory alarm) runs with the aggregator.
            metrics = client.get("/metrics").text
            a = redis.Redis(port=port, username="a", password=pw["a"])
            b_keys = [k for k in keys if k.startswith("b:")]
            # b's worker listens for remote control on this one (a PSUBSCRIBE pattern
            # without wildcards, so PUBSUB CHANNELS does not list it), plus result channels.
            b_channels = ["b:/0.celery.pidbox", *(c for c in channels if c.startswith("b:"))]
            refused = _attempts(a, b_keys, b_channels)
    finally:
        for w in workers:
            w.stop()
    assert run["status"] == "completed", (run["reason"], [w.log()[-2000:] for w in workers])
    assert set(run["history"][0]["participants"]) == {"a", "b"}
    for w in workers:
        assert "NOPERM" not in w.log(), w.log()[-3000:]  # the honest path never hits the ACL
    assert refusals == [], refusals
    assert 'leukofed_broker_hospital_bytes{hospital="a"}' in metrics
    assert "leukofed_broker_memory_alarm 0.0" in metrics
    # Nothing shared: every key and channel of the round is under one hospital's prefix
    # (kombu's unacked/unacked_index and bindings included).
    assert keys and all(k.startswith(("a:", "b:")) for k in keys), keys
    assert any(k.startswith("a:") for k in keys) and b_keys, keys
    assert all(c.startswith(("a:", "b:")) for c in channels), channels
    assert patterns >= 2  # both workers' remote-control subscriptions got through the ACL
    assert all(refused.values()), {k: v for k, v in refused.items() if not v}


def _attempts(a: redis.Redis, b_keys: list[str], b_channels: list[str]) -> dict[str, bool]:
    """Each attempt by hospital a's user on b's live keys and channels: True when refused."""
    attempts = {
        "pop b's queue": lambda: a.rpop("b:hospital.b"),
        "inject into b's queue": lambda: a.lpush("b:hospital.b", b"evil"),
        "read b's unacked": lambda: a.hgetall("b:unacked"),
        "publish on b's remote control": lambda: a.publish(b_channels[0], b"x"),
    }
    for key in b_keys:  # every key b's traffic left: results, bindings, ...
        attempts[f"read {key}"] = lambda key=key: a.type(key)
    refused = {}
    for what, attempt in attempts.items():
        try:
            attempt()
            refused[what] = False
        except redis.exceptions.NoPermissionError:
            refused[what] = True
    sub = a.pubsub()
    try:
        sub.subscribe(b_channels[0])
        sub.get_message(timeout=1)
        refused["subscribe to b's channel"] = False
    except redis.exceptions.NoPermissionError:
        refused["subscribe to b's channel"] = True
    return refused
