"""Following the champion alias under load, with a real MLflow server and real uvicorn.

1. No champion: the service starts, is live, and reports not-ready with the reason.
2. A version is promoted: the service becomes ready on it without a restart.
3. The alias moves while 16 clients send requests: zero requests fail, each client sees
   version 1 and then only version 2, and the requests after the swap get version 2.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from inference_support import ServiceProcess, encode, noise_image, register_tiny_model

from registry.model_versions import set_alias

pytestmark = pytest.mark.integration

NAME = "leukofed-hotswap-it"
CLIENTS = 16


@pytest.fixture(scope="module")
def service(mlflow_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    tmp = tmp_path_factory.mktemp("hotswap")
    svc = ServiceProcess(free_port(), {
        "LEUKOFED_INFERENCE_TRACKING_URI": mlflow_server.url,
        "LEUKOFED_INFERENCE_MODEL_NAME": NAME,
        "LEUKOFED_INFERENCE_ONNX_CACHE_DIR": str(tmp / "cache"),
        "LEUKOFED_INFERENCE_POLL_INTERVAL_S": "0.5",
        "LEUKOFED_INFERENCE_THREADS": "1",
    }, tmp / "service.log")
    try:
        yield svc.start()
    finally:
        svc.stop()


def test_not_ready_without_champion_then_ready_after_promotion(service: ServiceProcess,
                                                               mlflow_server) -> None:
    deadline = time.monotonic() + 30
    while True:
        status, body = service.get("/readyz")
        if "alias 'champion'" in (body or {}).get("status", "") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 503 and "alias 'champion'" in body["status"], body
    assert service.get("/healthz")[0] == 200
    r = httpx.post(f"{service.url}/v1/predict", files={"file": ("x.png", b"x", "image/png")})
    assert r.status_code in (415, 503)  # bad input is reported even before a model exists

    version = register_tiny_model(mlflow_server.url, NAME, seed=21, champion=True)
    promoted = time.monotonic()
    ready = service.wait_ready(timeout=180, version=version)
    # The first swap after start-up: from the alias moving to serving, within 5 s.
    assert time.monotonic() - promoted < 5.0
    assert ready["model"] == {"name": NAME, "version": version, "alias": "champion"}


def test_alias_moves_under_16_concurrent_clients_with_zero_failures(
        service: ServiceProcess, mlflow_server, tmp_path: Path) -> None:
    old = service.wait_ready(timeout=5)["model"]["version"]
    new = register_tiny_model(mlflow_server.url, NAME, seed=22)  # candidate, not champion
    image = encode(noise_image(48, 5), "PNG")
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(CLIENTS)]
    failures: list[str] = []

    def client(i: int) -> None:
        with httpx.Client(base_url=service.url, timeout=60) as http:
            while not stop.is_set():
                try:
                    r = http.post("/v1/predict", files={"file": (f"c{i}.png", image, "image/png")})
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        seen[i].append(r.json()["model"]["version"])
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while not all(seen) and not failures:  # every client answered by the old version
            assert time.monotonic() < deadline, "clients never got an answer"
            time.sleep(0.05)
        set_alias(new, "champion", NAME)
        promoted = time.monotonic()
        service.wait_ready(timeout=180, version=new)
        assert time.monotonic() - promoted < 5.0  # promotion to serving, under load
        counts_at_swap = [len(s) for s in seen]
        deadline = time.monotonic() + 60
        while any(len(s) < c + 5 for s, c in zip(seen, counts_at_swap)):
            assert time.monotonic() < deadline, "clients stalled after the swap"
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == []
    total = sum(len(s) for s in seen)
    assert total > CLIENTS * 5
    for versions in seen:
        assert versions[0] == old
        # Monotonic: once a client got the new version it never sees the old one again.
        first_new = versions.index(new)
        assert set(versions[first_new:]) == {new}
    for versions, at_swap in zip(seen, counts_at_swap):
        assert set(versions[at_swap + 1:]) == {new}  # every later request: new version
    metrics = httpx.get(f"{service.url}/metrics").text
    assert "leukofed_model_swaps_total 2.0" in metrics
    assert f"leukofed_model_version {float(new)}" in metrics
