"""Inference hygiene in-process: per-client rate limiting (429 + Retry-After, health probes
exempt, off by default) and the security headers on the page, static files, API and errors.

The real-browser check that the Content-Security-Policy does not break the page is
tests/browser/test_page.py (it fails on any CSP violation reported in the console)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_inference_app import FakeRegistry, make_client, png, wait_version

from services.inference.http_guards import PAGE_CSP, TokenBuckets

HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY",
           "referrer-policy": "no-referrer"}


@pytest.fixture
def registry() -> FakeRegistry:
    reg = FakeRegistry()
    reg.champion = "1"
    return reg


def upload() -> dict:
    return {"files": ("x.png", png(), "image/png")}


def test_token_bucket_refills_at_the_rate_and_caps_at_the_burst() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [buckets.take("ip") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("ip") == pytest.approx(0.5)  # one token every 1/rate s
    assert buckets.take("other") == 0.0  # per client
    now[0] += 0.5
    assert buckets.take("ip") == 0.0
    now[0] += 100  # idle: refills to the burst, not beyond
    assert [buckets.take("ip") for _ in range(4)][-1] > 0


def test_token_bucket_memory_is_bounded() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate_per_s=10.0, burst=1, max_clients=100, clock=lambda: now[0])
    for i in range(100):
        buckets.take(f"10.0.0.{i}")
    now[0] += 1.0  # every bucket has refilled: the next new client triggers pruning
    buckets.take("10.0.1.1")
    assert len(buckets) == 1


def test_rate_limit_answers_429_with_retry_after_per_client(tmp_path: Path,
                                                           registry: FakeRegistry) -> None:
    with make_client(tmp_path, registry, rate_limit_per_s=0.01, rate_limit_burst=3) as c:
        wait_version(c, "1")  # /readyz polling is exempt, so it spends no tokens
        statuses = [c.post("/v1/predict", files=upload()).status_code for _ in range(3)]
        assert statuses == [200, 200, 200]
        limited = c.post("/v1/predict", files=upload())
        assert limited.status_code == 429
        body = limited.json()
        assert "rate limit exceeded" in body["error"] and "retry after" in body["error"]
        assert int(limited.headers["retry-after"]) == body["retry_after_s"] >= 1
        assert limited.headers["x-frame-options"] == "DENY"  # headers on a 429 too
        assert c.get("/v1/model").status_code == 429  # every route, not just predict
        # Probes and metrics stay open: an orchestrator must not restart a busy service.
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        metrics = c.get("/metrics")
        assert metrics.status_code == 200 and 'status="429"' in metrics.text
        # Another client address has its own bucket (same app, second TestClient).
        other = TestClient(c.app, client=("10.1.2.3", 4000))
        assert other.get("/v1/model").status_code == 200  # (predict would need its loop)


def test_rate_limit_is_off_by_default(client_default: TestClient) -> None:
    assert all(client_default.get("/v1/model").status_code == 200 for _ in range(60))


@pytest.fixture
def client_default(tmp_path: Path, registry: FakeRegistry):
    with make_client(tmp_path, registry) as c:
        wait_version(c, "1")
        yield c


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/static/style.css", "/v1/model",
                                  "/readyz", "/healthz", "/metrics", "/v2/models/leukofed-unit",
                                  "/no-such-route", "/openapi.json"])
def test_security_headers_on_every_response(client_default: TestClient, path: str) -> None:
    r = client_default.get(path)
    for name, value in HEADERS.items():
        assert r.headers[name] == value, (path, name)
    assert r.headers["content-security-policy"] == PAGE_CSP


def test_security_headers_on_api_errors(client_default: TestClient) -> None:
    bad = client_default.post("/v1/predict",
                              files={"files": ("notes.txt", b"text" * 10, "text/plain")})
    assert bad.status_code == 415
    huge = client_default.post("/v1/predict",
                               files={"files": ("big.bmp", b"BM" + bytes(2_000_000), "x/y")})
    assert huge.status_code == 413  # refused by the body-limit middleware, still with headers
    for r in (bad, huge):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


def test_page_csp_allows_only_self_plus_the_heat_map_and_photo_images() -> None:
    directives = dict(d.strip().split(" ", 1) for d in PAGE_CSP.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["img-src"] == "'self' data: blob:"  # base64 heat map, object-URL photo
    assert "unsafe" not in PAGE_CSP and "http" not in PAGE_CSP
    # The shipped page has nothing the policy would block: no inline script, style or handler.
    static = Path(__file__).resolve().parents[2] / "services" / "inference" / "static"
    html = (static / "index.html").read_text()
    assert "<script>" not in html and "style=" not in html and "<style" not in html
    assert not re.search(r"<[^>]*\son[a-z]+\s*=", html)  # no onclick= etc.
    assert "http://" not in html and "https://" not in html


def test_docs_page_gets_a_policy_that_lets_swagger_load(client_default: TestClient) -> None:
    r = client_default.get("/docs")
    csp = r.headers["content-security-policy"]
    assert "https://cdn.jsdelivr.net" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-frame-options"] == "DENY"
