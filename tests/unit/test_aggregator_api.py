"""The aggregator's REST API with a fake run manager: validation errors are 422 with a
message; runs can be listed, read and cancelled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.aggregator.app import create_app
from services.aggregator.config import RunConfig
from services.aggregator.run_records import RunStore
from services.aggregator.settings import AggregatorSettings


class FakeDispatcher:
    last_seen: dict[str, float] = {"a": 1.0}
    describes: dict[str, dict[str, Any]] = {"a": {"num_images": 10}}

    def live_hospitals(self) -> set[str]:
        return {"a"}

    def describe(self, hospitals: list[str]) -> dict[str, Any]:
        return self.describes


class FakeManager:
    def __init__(self, store: RunStore) -> None:
        self.store = store
        self.dispatcher = FakeDispatcher()

    def start(self, resume: bool = True) -> None:
        pass

    def stop(self) -> None:
        pass

    def submit(self, cfg: RunConfig) -> dict[str, Any]:
        return self.store.create(cfg.model_dump())

    def cancel(self, run_id: str) -> dict[str, Any] | None:
        rec = self.store.load(run_id)
        if rec:
            rec["status"] = "cancelled"
            self.store.save(rec)
        return rec


@pytest.fixture
def api(tmp_path: Path):
    settings = AggregatorSettings(state_dir=tmp_path, tracking=False)
    with TestClient(create_app(settings, FakeManager(RunStore(tmp_path)))) as client:
        yield client


@pytest.mark.parametrize("body, message", [
    ({"strategy": "fedfoo"}, "unknown strategy"),
    ({"strategy": "fedadam", "strategy_params": {"eta": -1}}, "eta must be"),
    ({"model": "resnet"}, "unknown model"),
    ({"hospitals": ["a"], "min_fit_clients": 3}, "min_fit_clients"),
    ({"hospitals": ["Bad Id"]}, "invalid hospital id"),
    ({"rounds": 0}, "greater than or equal to 1"),
    ({"unknown_field": 1}, "Extra inputs"),
])
def test_invalid_config_is_422_with_message(api: TestClient, body: dict, message: str) -> None:
    response = api.post("/v1/runs", json=body)
    assert response.status_code == 422
    assert message in response.text


def test_runs_lifecycle(api: TestClient) -> None:
    response = api.post("/v1/runs", json={"rounds": 2, "strategy": "fedprox",
                                          "strategy_params": {"mu": 0.1}})
    assert response.status_code == 201
    run_id = response.json()["id"]
    assert [r["id"] for r in api.get("/v1/runs").json()] == [run_id]
    detail = api.get(f"/v1/runs/{run_id}").json()
    assert detail["status"] == "queued" and detail["config"]["strategy_params"] == {"mu": 0.1}
    assert api.post(f"/v1/runs/{run_id}/cancel").status_code == 200
    assert api.get(f"/v1/runs/{run_id}").json()["status"] == "cancelled"
    assert api.get("/v1/runs/nope").status_code == 404
    hospitals = api.get("/v1/hospitals").json()
    assert hospitals[0]["hospital"] == "a" and hospitals[0]["live"]
    assert hospitals[0]["num_images"] == 10
    assert api.get("/openapi.json").status_code == 200
