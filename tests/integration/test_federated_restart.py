"""The aggregator process killed (SIGKILL) in the middle of a run and started again: the run
resumes after its last completed round and the registry holds exactly one version per round."""

from __future__ import annotations

from pathlib import Path

import pytest
from fedstack import (
    AggregatorProcess,
    Worker,
    finished,
    get_run,
    start_run,
    wait_run,
)

pytestmark = pytest.mark.integration


def test_aggregator_killed_and_restarted_resumes(tmp_path: Path, redis_server,
                                                 mlflow_server) -> None:
    from mlflow import MlflowClient

    workers = [Worker.in_tmp(tmp_path, h, redis_server.url,
                             {"LEUKOFED_DRILL_DELAY_S": "1.5"}).start() for h in ("a", "b")]
    agg = AggregatorProcess(redis_server.url, tmp_path / "agg", mlflow_server.url,
                            model_name="leukofed-it-restart")
    try:
        agg.start()
        for w in workers:
            w.wait_ready()
        run_id = start_run(agg.url, {"rounds": 3, "hospitals": ["a", "b"],
                                     "min_fit_clients": 2, "round_deadline_s": 90})
        wait_run(lambda: get_run(agg.url, run_id),
                 lambda r: r["current_round"] == 2 and r["versions"].get("1"), 180)
        agg.kill()
        killed = get_run_from_disk(tmp_path / "agg", run_id)
        assert killed["status"] == "running" and killed["completed_round"] == 1
        agg.start()
        run = wait_run(lambda: get_run(agg.url, run_id), finished, 180)
    finally:
        agg.stop()
        for w in workers:
            w.stop()
    assert run["status"] == "completed", run["reason"]
    assert [r["round"] for r in run["history"]] == [1, 2, 3]
    assert any("resumed after round 1" in e["message"] for e in run["events"])
    versions = MlflowClient(mlflow_server.url, mlflow_server.url).search_model_versions(
        "name='leukofed-it-restart'")
    rounds = sorted(int(v.tags["round"]) for v in versions if v.tags.get("run_id") == run_id)
    assert rounds == [1, 2, 3], f"duplicate or missing rounds in the registry: {rounds}"


def get_run_from_disk(state_dir: Path, run_id: str) -> dict:
    import json

    return json.loads((state_dir / "runs" / run_id / "run.json").read_text())
