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

    def progress(self, run_id: str | None = None) -> dict[str, Any] | None:
        return None

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


def test_openapi_lists_each_strategys_parameters(api: TestClient) -> None:
    """The run form documents every strategy's parameters, not an untyped map."""
    schemas = api.get("/openapi.json").json()["components"]["schemas"]
    params = schemas["RunConfig"]["properties"]["strategy_params"]
    listed = {ref["$ref"].rsplit("/", 1)[-1] for ref in params["anyOf"]}
    assert {"FedProxParams", "FedAvgMParams", "FedAdamParams", "MultiKrumParams"} <= listed
    assert "mu" in schemas["FedProxParams"]["properties"]
    assert {"server_lr", "momentum"} <= set(schemas["FedAvgMParams"]["properties"])
    assert {"eta", "beta_1", "beta_2", "tau"} <= set(schemas["FedYogiParams"]["properties"])
    assert schemas["FedTrimmedAvgParams"]["properties"]["beta"]["default"] == 0.2


def test_an_unknown_strategy_parameter_is_422_naming_it(api: TestClient) -> None:
    response = api.post("/v1/runs", json={"strategy": "fedavgm",
                                          "strategy_params": {"momentum": 0.5, "mu": 0.1}})
    assert response.status_code == 422
    assert "fedavgm does not take ['mu']" in response.text
    assert "momentum" in response.text  # what it does take


def test_the_typed_parameters_are_what_each_strategy_takes() -> None:
    from leukofed.strategies import STRATEGIES, make_strategy, strategy_params
    from services.aggregator.strategy_config import STRATEGY_PARAMS

    assert set(STRATEGY_PARAMS) == set(STRATEGIES)
    for name, model in STRATEGY_PARAMS.items():
        own = strategy_params(STRATEGIES[name]) - {"bn_mode", "bn_stat_names"}
        if name == "krum":  # inherited from multikrum, but krum fixes it at 1
            own -= {"num_selected"}
        assert set(model.model_fields) == own, name
        # The model's defaults build the strategy as its own defaults do.
        assert make_strategy(name, **model().model_dump()).params == make_strategy(name).params
