"""The app in-process (TestClient) with a fake registry: routes, errors, swaps, refusals.

The model is a real onnxruntime session on a tiny ONNX graph built without TensorFlow;
only the registry lookup and the export are replaced. The service under real uvicorn with
a real MLflow server is covered in tests/integration/test_inference_*.py.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from inference_support import (
    BAD_INPUT_MAX_PIXELS,
    BAD_INPUT_MAX_UPLOAD_BYTES,
    bad_inputs,
    encode,
    good_inputs,
    noise_image,
    tiny_onnx,
)
from PIL import Image

from leukofed.export import ParityError
from services.inference.app import create_app
from services.inference.imaging import InputError, decode_upload
from services.inference.model_source import ModelSource
from services.inference.onnx_files import OnnxArtifact, VersionInfo, sha256
from services.inference.runtime import ProviderError, make_session
from services.inference.settings import InferenceSettings

NAME = "leukofed-unit"


class FakeRegistry:
    """The alias as a mutable attribute; versions whose export 'fails parity'."""

    def __init__(self) -> None:
        self.champion: str | None = None
        self.bad_parity: set[str] = set()
        self.fetched: list[str] = []
        self.polls = 0  # how often the watcher asked

    def resolve(self) -> VersionInfo | None:
        self.polls += 1
        if self.champion is None:
            return None
        return VersionInfo(NAME, self.champion, f"run-{self.champion}", {})

    def fetch(self, info: VersionInfo) -> OnnxArtifact:
        self.fetched.append(info.version)
        if info.version in self.bad_parity:
            raise ParityError("ONNX and Keras outputs differ by 0.3 > 0.0001; not written")
        data = tiny_onnx(image_size=16, seed=int(info.version))
        return OnnxArtifact(data, sha256(data), "exported", 1e-7)


def settings(tmp_path: Path, **extra: object) -> InferenceSettings:
    return InferenceSettings(
        tracking_uri="http://unused", model_name=NAME, poll_interval_s=0.05,
        onnx_cache_dir=tmp_path, max_upload_bytes=BAD_INPUT_MAX_UPLOAD_BYTES,
        max_pixels=BAD_INPUT_MAX_PIXELS, threads=1, **extra)


@pytest.fixture
def registry() -> FakeRegistry:
    reg = FakeRegistry()
    reg.champion = "1"
    return reg


def make_client(tmp_path: Path, registry: FakeRegistry, **extra: object) -> TestClient:
    s = settings(tmp_path, **extra)
    source = ModelSource(s, resolver=registry.resolve, fetch_onnx=registry.fetch)
    return TestClient(create_app(s, source))


@pytest.fixture
def client(tmp_path: Path, registry: FakeRegistry) -> Iterator[TestClient]:
    with make_client(tmp_path, registry) as c:
        wait_version(c, "1")
        yield c


def wait_version(client: TestClient, version: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/readyz")
        if r.status_code == 200 and r.json()["model"]["version"] == version:
            return
        time.sleep(0.02)
    raise AssertionError(f"never served version {version}: {client.get('/readyz').json()}")


def png(seed: int = 0) -> bytes:
    return encode(noise_image(32, seed), "PNG")


def test_predict_returns_probabilities_in_upload_order(client: TestClient) -> None:
    files = [("files", (f"img{i}.png", png(i), "image/png")) for i in range(3)]
    body = client.post("/v1/predict", files=files).json()
    assert body["model"] == {"name": NAME, "version": "1", "alias": "champion"}
    assert [p["filename"] for p in body["predictions"]] == ["img0.png", "img1.png", "img2.png"]
    for p in body["predictions"]:
        assert list(p["probabilities"]) == ["Benign", "Early", "Pre", "Pro"]
        assert sum(p["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)
    single = client.post("/v1/predict", files={"file": ("one.png", png(0), "image/png")})
    assert single.json()["predictions"][0]["probabilities"] == \
        body["predictions"][0]["probabilities"]


@pytest.mark.parametrize(("case", "filename", "data"), good_inputs(),
                         ids=[c[0] for c in good_inputs()])
def test_every_supported_format_and_mode_classifies(client: TestClient, case: str,
                                                    filename: str, data: bytes) -> None:
    r = client.post("/v1/predict", files={"files": (filename, data, "application/octet-stream")})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["filename"] == filename


@pytest.mark.parametrize(("case", "filename", "data", "status", "message"), bad_inputs(),
                         ids=[c[0] for c in bad_inputs()])
def test_bad_input_gets_its_status_and_the_service_keeps_serving(
        client: TestClient, case: str, filename: str, data: bytes, status: int,
        message: str) -> None:
    r = client.post("/v1/predict", files={"files": (filename, data, "application/octet-stream")})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    ok = client.post("/v1/predict", files={"files": ("good.png", png(), "image/png")})
    assert ok.status_code == 200


def test_decode_errors_map_to_statuses_by_kind() -> None:
    # Pins the wording of leukofed.preprocessing that imaging.status_for relies on.
    for _, filename, data, status, _ in bad_inputs():
        if len(data) > BAD_INPUT_MAX_UPLOAD_BYTES:
            continue
        with pytest.raises(InputError) as err:
            decode_upload(filename, data, BAD_INPUT_MAX_UPLOAD_BYTES, BAD_INPUT_MAX_PIXELS)
        assert err.value.status == status


def test_no_files_and_too_many_files_are_client_errors(client: TestClient) -> None:
    assert client.post("/v1/predict", data={"x": "1"}).status_code == 422
    many = [("files", (f"{i}.png", png(), "image/png")) for i in range(40)]
    r = client.post("/v1/predict", files=many)
    assert r.status_code == 413 and "limit is 32" in r.json()["error"]


def test_explain_returns_prediction_and_a_png_heat_map(client: TestClient) -> None:
    r = client.post("/v1/explain", files={"file": ("x.png", png(3), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    heat = Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["png_base64"])))
    assert heat.format == "PNG" and heat.mode == "RGBA"
    assert body["heatmap"]["explained_class"] == body["prediction"]["label"]
    predicted = client.post("/v1/predict", files={"file": ("x.png", png(3), "image/png")})
    assert body["prediction"]["probabilities"] == pytest.approx(
        predicted.json()["predictions"][0]["probabilities"], abs=1e-6)


def test_model_route_describes_runtime_and_onnx(client: TestClient) -> None:
    m = client.get("/v1/model").json()
    assert m["version"] == "1" and m["classes"] == ["Benign", "Early", "Pre", "Pro"]
    assert m["input"] == {"name": "image", "datatype": "FP32", "shape": [-1, 16, 16, 3]}
    assert m["provider"] == "CPUExecutionProvider" and len(m["onnx_sha256"]) == 64
    assert m["preprocessing"]["layout"] == "NHWC"


def test_alias_move_swaps_and_parity_failure_keeps_the_old_version(
        client: TestClient, registry: FakeRegistry) -> None:
    registry.champion = "2"
    wait_version(client, "2")
    registry.bad_parity.add("3")
    registry.champion = "3"
    deadline = time.monotonic() + 5
    while "3" not in client.get("/readyz").json()["refused_versions"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    ready = client.get("/readyz").json()
    assert ready["model"]["version"] == "2" and "parity" in ready["last_error"]
    r = client.post("/v1/predict", files={"file": ("x.png", png(), "image/png")})
    # Still answered by version 2, which is no longer called champion: the alias left it.
    assert r.json()["model"] == {"name": NAME, "version": "2", "alias": None}
    assert client.get("/v1/model").json()["alias"] is None
    polls = registry.polls
    deadline = time.monotonic() + 5
    while registry.polls < polls + 3:  # three more polls of the alias, still on version 3
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert registry.fetched.count("3") == 1  # refused for good, not retried every poll
    registry.champion = "2"  # moved back: version 2 is champion again
    deadline = time.monotonic() + 5
    while client.get("/readyz").json()["model"]["alias"] != "champion":
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_not_ready_without_champion_then_ready(tmp_path: Path) -> None:
    reg = FakeRegistry()
    with make_client(tmp_path, reg) as c:
        deadline = time.monotonic() + 5
        while reg.polls < 2:  # the watcher has looked (twice) and found no champion
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = c.get("/readyz")
        assert r.status_code == 503 and "alias 'champion'" in r.json()["status"]
        p = c.post("/v1/predict", files={"file": ("x.png", png(), "image/png")})
        assert p.status_code == 503 and "not ready" in p.json()["error"]
        assert c.get("/v2/health/ready").status_code == 503
        assert c.get("/healthz").status_code == 200
        reg.champion = "1"
        wait_version(c, "1")
        assert c.get("/v2/health/ready").status_code == 200


def test_api_key_is_enforced_when_configured(tmp_path: Path, registry: FakeRegistry) -> None:
    with make_client(tmp_path, registry, api_key="s3cret") as c:
        wait_version(c, "1")
        files = {"file": ("x.png", png(), "image/png")}
        assert c.post("/v1/predict", files=files).status_code == 401
        assert c.post("/v1/predict", files=files,
                      headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.post("/v1/predict", files=files,
                      headers={"X-API-Key": "s3cret"}).status_code == 200
        # A key with non-ASCII bytes is a wrong key (401), not a server error.
        assert c.post("/v1/predict", files=files,
                      headers={"X-API-Key": "s3cr\u00e9t".encode()}).status_code == 401
        assert c.get("/v2/models/leukofed-unit").status_code == 401
        assert c.get("/healthz").status_code == 200  # probes need no key
        assert c.get("/").status_code == 200


def _v2_input(x: np.ndarray) -> dict:
    return {"name": "image", "datatype": "FP32", "shape": list(x.shape),
            "data": x.reshape(-1).tolist()}


def test_v2_json_and_binary_tensors_match_v1(client: TestClient) -> None:
    from leukofed.preprocessing import load_image

    x = load_image(png(5), 16)[None].astype(np.float32)
    v1 = client.post("/v1/predict", files={"file": ("x.png", png(5), "image/png")}).json()
    expected = list(v1["predictions"][0]["probabilities"].values())
    meta = client.get(f"/v2/models/{NAME}").json()
    assert meta["inputs"][0] == {"name": "image", "datatype": "FP32", "shape": [-1, 16, 16, 3]}
    r = client.post(f"/v2/models/{NAME}/infer", json={"id": "7", "inputs": [_v2_input(x)]})
    out = r.json()
    assert out["id"] == "7" and out["model_version"] == "1"
    assert out["outputs"][0]["data"] == pytest.approx(expected, abs=1e-6)
    # Binary tensor extension, both ways.
    import json

    header = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 16, 16, 3],
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "probabilities",
                                      "parameters": {"binary_data": True}}]}).encode()
    r = client.post(f"/v2/models/{NAME}/versions/1/infer", content=header + x.tobytes(),
                    headers={"Inference-Header-Content-Length": str(len(header))})
    n = int(r.headers["Inference-Header-Content-Length"])
    probs = np.frombuffer(r.content[n:], np.float32)
    assert probs == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("path", "payload", "status", "message"), [
    (f"/v2/models/{NAME}/infer", {"inputs": []}, 400, "exactly one input"),
    (f"/v2/models/{NAME}/infer", {"inputs": [{"name": "image", "datatype": "FP32",
                                              "shape": [1, 8, 8, 3], "data": [0] * 192}]},
     400, "does not match"),
    (f"/v2/models/{NAME}/infer", {"inputs": [{"name": "image", "datatype": "FP32",
                                              "shape": [1, 16, 16, 3], "data": [0] * 5}]},
     400, "needs 768"),
    (f"/v2/models/{NAME}/infer", {"inputs": [{"name": "image", "datatype": "BYTES",
                                              "shape": [1, 16, 16, 3], "data": []}]},
     400, "not supported"),
    ("/v2/models/other/infer", {"inputs": []}, 404, "unknown model"),
    (f"/v2/models/{NAME}/versions/9/infer", {"inputs": []}, 404, "not loaded"),
])
def test_v2_errors_use_the_protocol_error_shape(client: TestClient, path: str, payload: dict,
                                                status: int, message: str) -> None:
    r = client.post(path, json=payload)
    assert r.status_code == status and message in r.json()["error"]


def test_metrics_count_requests_batches_and_model(client: TestClient) -> None:
    client.post("/v1/predict", files={"file": ("x.png", png(), "image/png")})
    client.post("/v1/predict", files={"file": ("x.txt", b"nope", "text/plain")})
    text = client.get("/metrics").text
    assert 'leukofed_http_requests_total{method="POST",route="/v1/predict",status="200"}' in text
    assert 'route="/v1/predict",status="415"' in text
    assert "leukofed_batch_size_bucket" in text
    # Invented methods share one label: a client cannot grow the metrics without bound.
    for method in ("FOO", "BAR"):
        client.request(method, "/v1/predict")
    text = client.get("/metrics").text
    assert 'method="other"' in text and 'method="FOO"' not in text
    assert f'leukofed_model_info{{alias="champion",name="{NAME}",provider="CPUExecutionProvider"'\
           ',version="1"} 1.0' in text


def test_page_and_static_assets_are_served(client: TestClient) -> None:
    page = client.get("/").text
    assert "Decision support, not a diagnosis" in page and 'for="file-input"' in page
    assert "http" not in page.replace("http-equiv", "")  # no CDN: nothing external
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/docs").status_code == 200


def test_cuda_demand_fails_loudly_without_a_gpu() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA provider is available here")
    with pytest.raises(ProviderError, match="provider=cuda"):
        make_session(tiny_onnx(), provider="cuda")
    assert make_session(tiny_onnx(), provider="auto").get_providers() == ["CPUExecutionProvider"]


def test_settings_defaults_match_the_issue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    s = InferenceSettings()
    assert s.max_upload_bytes == 20 * 1024 * 1024 and s.port == 8000
    assert s.target == "champion" and s.tracking_uri == "http://mlflow:5000"
    monkeypatch.setenv("LEUKOFED_INFERENCE_MODEL_VERSION", "4")
    assert InferenceSettings().target == "4"
