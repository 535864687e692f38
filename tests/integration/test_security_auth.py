"""Service auth: the aggregator's API answers 401 without the admin token, 403 with a wrong
one, and works with the right one (from the environment or a secret file); the token never
shows in the settings' repr or the logs; /healthz stays open for probes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.aggregator.app import create_app
from services.aggregator.run_records import RunStore
from services.aggregator.settings import AggregatorSettings

TOKEN = "s3cret-admin-token-for-tests"


class FakeManager:
    """Just enough of RunManager for the routes to answer."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self.dispatcher = self
        self.last_seen: dict[str, float] = {}
        self.describes: dict[str, Any] = {}

    def start(self, resume: bool = True) -> None:
        pass

    def stop(self) -> None:
        pass

    def live_hospitals(self) -> set[str]:
        return set()

    def progress(self, run_id: str | None = None) -> dict[str, Any] | None:
        return None

    def submit(self, cfg: Any) -> dict[str, Any]:
        return self.store.create(cfg.model_dump())

    def cancel(self, run_id: str) -> dict[str, Any] | None:
        return self.store.load(run_id)


@pytest.fixture(params=["env", "file"])
def api(request, tmp_path: Path, monkeypatch):
    if request.param == "env":
        monkeypatch.setenv("LEUKOFED_AGGREGATOR_ADMIN_TOKEN", TOKEN)
    else:
        (tmp_path / "token").write_text(TOKEN + "\n")
        monkeypatch.setenv("LEUKOFED_AGGREGATOR_ADMIN_TOKEN_FILE", str(tmp_path / "token"))
    settings = AggregatorSettings(state_dir=tmp_path, tracking=False)
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.model_dump())
    with TestClient(create_app(settings, FakeManager(RunStore(tmp_path)))) as client:
        yield client


@pytest.mark.parametrize(("method", "path"), [
    ("get", "/v1/runs"), ("post", "/v1/runs"), ("get", "/v1/runs/x"),
    ("post", "/v1/runs/x/cancel"), ("get", "/v1/hospitals")])
def test_every_api_route_needs_the_token(api: TestClient, method: str, path: str,
                                         caplog: pytest.LogCaptureFixture) -> None:
    kwargs = {"json": {"rounds": 1}} if method == "post" and path == "/v1/runs" else {}
    none = api.request(method, path, **kwargs)
    assert none.status_code == 401 and none.headers["www-authenticate"] == "Bearer"
    assert api.request(method, path, headers={"Authorization": "Basic abc"},
                       **kwargs).status_code == 401
    with caplog.at_level(logging.WARNING):
        wrong = api.request(method, path, headers={"Authorization": "Bearer nope"}, **kwargs)
    assert wrong.status_code == 403
    assert "nope" not in caplog.text and TOKEN not in caplog.text
    right = api.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"}, **kwargs)
    assert right.status_code not in (401, 403)


def test_health_stays_open(api: TestClient) -> None:
    assert api.get("/healthz").status_code == 200


def test_no_token_configured_keeps_the_api_open(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("LEUKOFED_AGGREGATOR_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("LEUKOFED_AGGREGATOR_ADMIN_TOKEN_FILE", raising=False)
    settings = AggregatorSettings(state_dir=tmp_path, tracking=False)
    with TestClient(create_app(settings, FakeManager(RunStore(tmp_path)))) as client:
        assert client.get("/v1/runs").status_code == 200
