"""One error body for every 4xx/5xx of both APIs (leukofed.http_errors): {"error": str}."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient
from test_aggregator_api import FakeManager
from test_inference_app import (
    BAD_INPUT_MAX_UPLOAD_BYTES,
    FakeRegistry,
    make_client,
    png,
    wait_version,
)

from leukofed import http_errors
from services.aggregator.app import create_app as aggregator_app
from services.aggregator.run_records import RunStore
from services.aggregator.settings import AggregatorSettings


def one_shape(response, status: int) -> str:  # noqa: ANN001 (an httpx response)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) - {"retry_after_s"} == {"error"}, body
    assert isinstance(body["error"], str) and "Traceback" not in body["error"]
    return body["error"]


def test_inference_errors_share_one_shape(tmp_path: Path) -> None:
    registry = FakeRegistry()  # no champion yet: not ready
    with make_client(tmp_path, registry) as client:
        one_shape(client.post("/v1/predict", files={"file": ("x.png", png(), "image/png")}), 503)
        one_shape(client.get("/v1/model"), 503)
        one_shape(client.get("/no/such/route"), 404)
        one_shape(client.delete("/v1/predict"), 405)
        big = b"x" * (BAD_INPUT_MAX_UPLOAD_BYTES + 1)
        assert "upload limit" in one_shape(
            client.post("/v1/predict", files={"file": ("x.png", big, "image/png")}), 413)
        one_shape(client.post("/v2/models/nope/infer", json={"inputs": []}), 404)
        registry.champion = "1"  # now serving
        wait_version(client, "1")
        assert "format" in one_shape(client.get("/v1/model/card?format=xml"), 422)
        one_shape(client.post("/v1/predict", files={"file": ("x.png", b"not an image",
                                                             "image/png")}), 415)


def test_aggregator_errors_share_one_shape(tmp_path: Path) -> None:
    settings = AggregatorSettings(state_dir=tmp_path, admin_token="t" * 32)
    app = aggregator_app(settings, FakeManager(RunStore(tmp_path)))
    with TestClient(app) as client:
        message = one_shape(client.get("/v1/runs"), 401)
        assert "token" in message.lower()
        auth = {"Authorization": "Bearer " + "t" * 32}
        one_shape(client.get("/v1/runs/nope", headers=auth), 404)
        assert "rounds" in one_shape(client.post("/v1/runs", json={"rounds": 0}, headers=auth),
                                     422)
        one_shape(client.get("/v1/runs", headers={"Authorization": "Bearer wrong"}), 403)


def test_an_unexpected_error_is_500_without_a_trace() -> None:
    app = FastAPI()
    http_errors.install(app)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals /etc/passwd")

    with TestClient(app, raise_server_exceptions=False) as client:
        message = one_shape(client.get("/boom"), 500)
    assert "secret" not in message and "passwd" not in message
