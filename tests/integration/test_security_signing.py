"""Signed tasks and updates through real redis-server and Celery workers: a task without the
aggregator's signature is refused by the hospital, and unsigned, forged and replayed updates
are rejected by the aggregator with their reason code in the run's event log while the honest
hospital's rounds complete."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fedstack import Worker, run_to_end, signing_env

from leukofed import signing
from leukofed.transport import TASK_DESCRIBE, TASK_FIT, make_celery

pytestmark = pytest.mark.integration
# Rounds that go on with any one hospital whose answer holds, one attempt each.
ANY_ONE = {"min_fit_clients": 1, "round_deadline_s": 90, "max_round_retries": 0}


@contextmanager
def signed_aggregator(tmp_path: Path, broker_url: str, keys: Path,
                      tracking_uri: str | None = None, **settings: Any
                      ) -> Iterator[TestClient]:
    from services.aggregator.app import create_app
    from services.aggregator.settings import AggregatorSettings

    pubs = tmp_path / "hospital-pubs"  # the aggregator holds only public keys of hospitals
    pubs.mkdir()
    for h in ("a", "b", "c"):
        (pubs / f"{h}.pub").write_bytes((keys / f"{h}.pub").read_bytes())
    config = AggregatorSettings(broker_url=broker_url, state_dir=tmp_path / "agg",
                                cache_dir=tmp_path / "cache", tracking=bool(tracking_uri),
                                mlflow_tracking_uri=tracking_uri,
                                model_name="leukofed-it-signed",
                                poll_interval_s=0.1, ping_timeout_s=0.5,
                                signing_key_file=keys / "aggregator.key",
                                hospital_keys_dir=pubs, **settings)
    with TestClient(create_app(config)) as client:
        yield client


def test_unsigned_task_refused_and_bad_updates_rejected(tmp_path: Path, redis_server) -> None:
    keys = tmp_path / "keys"
    signing.main(["generate", "--out", str(keys), "aggregator", "a", "b", "c"])

    def worker(h: str, fault: str = "") -> Worker:
        return Worker.in_tmp(tmp_path, h, redis_server.url,
                             {**signing_env(keys, h), "LEUKOFED_DRILL_FAULT": fault},
                             per_class=4).start()

    # a: honest. b: honest in round 1, replays its round-1 update in round 2.
    # c: unsigned update in round 1, signed with a key that is not c's in round 2.
    workers = [worker("a"), worker("b", ",replay"), worker("c", "unsigned,forged")]
    try:
        for w in workers:
            w.wait_ready(120)

        # Someone with broker access (no aggregator key) sends tasks straight to hospital a.
        intruder = make_celery("intruder", redis_server.url)
        fit = intruder.send_task(TASK_FIT, args=[b"x", {"run_id": "evil", "round": 1}],
                                 queue="hospital.a").get(timeout=60)
        assert fit["status"] == "declined" and fit["reason"] == "task_unsigned"
        forged = signing.sign_task(signing.load_private_key(keys / "a.key"), TASK_DESCRIBE, "a",
                                   [])
        described = intruder.send_task(TASK_DESCRIBE, kwargs={"auth": forged},
                                       queue="hospital.a").get(timeout=60)
        assert described["status"] == "declined" and described["reason"] == "task_forged"
        assert "class_counts" not in described

        with signed_aggregator(tmp_path, redis_server.url, keys) as client:
            run = run_to_end(client, {**ANY_ONE, "rounds": 2, "hospitals": ["a", "b", "c"]},
                             300)
    finally:
        for w in workers:
            w.stop()
    assert run["status"] == "completed", run["reason"]
    first, second = run["history"]
    assert set(first["participants"]) == {"a", "b"}
    assert first["rejected"]["c"].startswith("unsigned:")
    assert set(second["participants"]) == {"a"}
    assert second["rejected"]["b"].startswith("replay:")
    assert second["rejected"]["c"].startswith("forged:")
    codes = {(e.get("round"), e.get("hospital"), e.get("rejected")) for e in run["events"]}
    assert {(1, "c", "unsigned"), (2, "b", "replay"), (2, "c", "forged")} <= codes
    # Every task the aggregator signed was accepted: the only refusals are the intruder's two.
    refusals = {w.hospital: w.log().count("refused leukofed.client.") for w in workers}
    assert refusals == {"a": 2, "b": 0, "c": 0}
