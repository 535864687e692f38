"""BatchNorm calibration through real redis-server and Celery workers, with signed tasks and
answers: a FedAdam round ends with each hospital measuring the new global model's BatchNorm
statistics, the aggregator pooling them into the checkpointed model, and each hospital's
participation log recording what it sent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fedstack import TINY, Worker, finished, signing_env, wait_run
from test_security_signing import signed_aggregator

from leukofed import signing

pytestmark = pytest.mark.integration


def test_fedadam_round_pools_signed_batchnorm_statistics(tmp_path: Path, redis_server,
                                                          mlflow_server) -> None:
    keys = tmp_path / "keys"
    signing.main(["generate", "--out", str(keys), "aggregator", "a", "b", "c"])
    workers = [Worker.in_tmp(tmp_path, h, redis_server.url, signing_env(keys, h),
                             per_class=4).start() for h in ("a", "b")]
    try:
        for w in workers:
            w.wait_ready(120)
        with signed_aggregator(tmp_path, redis_server.url, keys, mlflow_server.url) as client:
            response = client.post("/v1/runs", json={
                **TINY, "rounds": 1, "strategy": "fedadam", "hospitals": ["a", "b"],
                "min_fit_clients": 2, "round_deadline_s": 120, "max_round_retries": 0})
            assert response.status_code == 201, response.text
            run_id = response.json()["id"]
            run = wait_run(lambda: client.get(f"/v1/runs/{run_id}").json(), finished, 240)
    finally:
        for w in workers:
            w.stop()
    assert run["status"] == "completed", run["reason"]
    calibration = run["history"][0]["bn_calibration"]
    assert set(calibration["hospitals"]) == {"a", "b"}, calibration
    assert calibration["rejected"] == {} and calibration["failed"] == {}
    assert all(n > 0 for n in calibration["hospitals"].values())

    # The checkpointed global model carries the pooled statistics: finite, variances >= 0.
    from services.aggregator.run_records import RunStore

    weights, _ = RunStore(tmp_path / "agg").read_checkpoint(run)
    sent = {}
    for h in ("a", "b"):
        entries = [json.loads(x) for x in (tmp_path / f"state-{h}" / "participation.jsonl")
                   .read_text().splitlines()]
        assert [e["task"] for e in entries if e["status"] == "ok"] == \
            ["fit", "calibrate", "evaluate"]
        sent[h] = next(e for e in entries if e["task"] == "calibrate")
        assert sent[h]["num_examples"] == calibration["hospitals"][h]
    variances = [v for n, v in weights.items() if n.endswith("moving_variance")]
    assert variances and all(np.isfinite(v).all() and (v >= 0).all() for v in variances)

    # The registered version names whose statistics it carries.
    from mlflow import MlflowClient

    version = MlflowClient(mlflow_server.url).get_model_version(
        "leukofed-it-signed", run["versions"]["1"])
    assert json.loads(version.tags["bn_calibration"]) == calibration["hospitals"]
