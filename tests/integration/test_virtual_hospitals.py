"""Many hospitals on one machine: 20 virtual hospitals in two worker processes and one
real hospital worker in the same run (real redis-server, real Celery, signed tasks and
answers, a real MLflow server), one of the virtual processes killed mid-round with its 3
hospitals. The round goes on without them as soon as
their heartbeats stop (not at the deadline), the next round selects only the live ones,
and every round registers a model version."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from fedstack import (
    TINY,
    VirtualWorker,
    Worker,
    finished,
    hospital_data,
    signing_env,
    wait_log,
    wait_run,
)

from leukofed import signing

pytestmark = pytest.mark.integration

IDS = [f"h{i:02d}" for i in range(1, 21)]
DOOMED = IDS[-3:]  # served by the process that is killed
REAL = "real"  # a real hospital worker beside the virtual ones
LIVE = sorted([*IDS[:-3], REAL])


def test_twenty_virtual_hospitals_three_killed_mid_round(tmp_path: Path, redis_server,
                                                         mlflow_server) -> None:
    from mlflow import MlflowClient

    from services.aggregator.app import create_app
    from services.aggregator.settings import AggregatorSettings

    hospitals = tmp_path / "hospitals"
    for h in IDS:
        hospital_data(hospitals, h, per_class=2)
    keys = tmp_path / "keys"
    signing.main(["generate", "--out", str(keys), "aggregator", *IDS, REAL])
    pubs = tmp_path / "hospital-pubs"  # the aggregator holds only the hospitals' public keys
    pubs.mkdir()
    for h in [*IDS, REAL]:
        (pubs / f"{h}.pub").write_bytes((keys / f"{h}.pub").read_bytes())

    def worker(name: str, ids: list[str]) -> VirtualWorker:
        return VirtualWorker(name, ids, hospitals, redis_server.url, tmp_path / "state",
                             tmp_path / "cache", {"LEUKOFED_VIRTUAL_KEYS_DIR": str(keys)}).start()

    many, doomed = worker("many", IDS[:-3]), worker("doomed", DOOMED)
    real = Worker.in_tmp(tmp_path, REAL, redis_server.url, signing_env(keys, REAL),
                         per_class=2).start()
    settings = AggregatorSettings(
        broker_url=redis_server.url, state_dir=tmp_path / "agg", cache_dir=tmp_path / "cache",
        tracking=True, mlflow_tracking_uri=mlflow_server.url, model_name="leukofed-it-virtual",
        poll_interval_s=0.1, ping_timeout_s=1.0, signing_key_file=keys / "aggregator.key",
        hospital_keys_dir=pubs, max_in_flight=8)
    try:
        many.wait_ready()
        doomed.wait_ready()
        real.wait_ready()
        with TestClient(create_app(settings)) as client:
            response = client.post("/v1/runs", json={
                **TINY, "rounds": 2, "hospitals": [*IDS, REAL], "min_fit_clients": 15,
                "round_deadline_s": 150, "max_round_retries": 0, "register_models": True})
            assert response.status_code == 201, response.text
            run_id = response.json()["id"]
            # Killed once it is training one of its hospitals: mid-round for certain.
            wait_log(doomed.log_path, "Task leukofed.client.fit[", 120, doomed.proc)
            progress = client.get(f"/v1/runs/{run_id}").json()["progress"]
            assert progress["round"] == 1 and progress["selected"] == 21
            killed_at = time.monotonic()
            doomed.kill()
            run = wait_run(lambda: client.get(f"/v1/runs/{run_id}").json(), finished, 300)
            assert run["status"] == "completed", run["reason"]
            first, second = run["history"]
            assert sorted(first["participants"]) == LIVE
            for h in DOOMED:
                assert first["failed"][h].startswith("worker lost: no heartbeat"), first["failed"]
            # Noticed by heartbeat, not by the 150 s deadline.
            assert first["timings"]["round_s"] < 100, first["timings"]
            assert time.monotonic() - killed_at < 140
            assert sorted(second["selected"]) == LIVE
            assert sorted(second["participants"]) == LIVE
            hospitals_seen = client.get("/v1/hospitals").json()
            seen = {h["hospital"]: h for h in hospitals_seen}
            assert seen["h01"]["seconds_since_seen"] < 30
            assert seen[DOOMED[0]]["seconds_since_seen"] > 5
            metrics = client.get("/metrics").text
            assert 'leukofed_hospital_last_seen_seconds{hospital="h01"}' in metrics

        versions = run["versions"]
        assert sorted(versions) == ["1", "2"]
        registry = MlflowClient(mlflow_server.url, registry_uri=mlflow_server.url)
        for version in versions.values():
            assert registry.get_model_version("leukofed-it-virtual", version).status == "READY"
        # Each virtual hospital kept its own participation log, like a real one.
        assert "fit" in (tmp_path / "state" / "h01" / "participation.jsonl").read_text()
    finally:
        many.stop()
        real.stop()
        doomed.kill()
