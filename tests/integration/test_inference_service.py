"""The inference service under real uvicorn, serving a model from a real MLflow server.

One service process for the module (start-up includes the tf2onnx export); a second
replica with an empty cache shows the ONNX file is reused from MLflow, not re-exported.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import free_port
from inference_support import (
    BAD_INPUT_MAX_PIXELS,
    BAD_INPUT_MAX_UPLOAD_BYTES,
    ServiceProcess,
    bad_inputs,
    encode,
    noise_image,
    register_tiny_model,
)

pytestmark = pytest.mark.integration

NAME = "leukofed-inference-it"
SIZE = 32


def service_env(mlflow_url: str, cache: Path) -> dict[str, str]:
    return {
        "LEUKOFED_INFERENCE_TRACKING_URI": mlflow_url,
        "LEUKOFED_INFERENCE_MODEL_NAME": NAME,
        "LEUKOFED_INFERENCE_ONNX_CACHE_DIR": str(cache),
        "LEUKOFED_INFERENCE_POLL_INTERVAL_S": "1",
        "LEUKOFED_INFERENCE_MAX_UPLOAD_BYTES": str(BAD_INPUT_MAX_UPLOAD_BYTES),
        "LEUKOFED_INFERENCE_MAX_PIXELS": str(BAD_INPUT_MAX_PIXELS),
        "LEUKOFED_INFERENCE_THREADS": "1",
    }


@pytest.fixture(scope="module")
def service(mlflow_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    register_tiny_model(mlflow_server.url, NAME, seed=11, image_size=SIZE, champion=True)
    tmp = tmp_path_factory.mktemp("inference")
    svc = ServiceProcess(free_port(), service_env(mlflow_server.url, tmp / "cache"),
                         tmp / "service.log")
    try:
        svc.start()
        svc.wait_ready(timeout=180, version="1")
        yield svc
    finally:
        svc.stop()


def png(seed: int = 0) -> bytes:
    return encode(noise_image(48, seed), "PNG")


def test_predicts_real_images_one_per_class(service: ServiceProcess, real_data: Path) -> None:
    files = [sorted((real_data / cls).glob("*.jpg"))[0] for cls in ("Benign", "Early", "Pre",
                                                                   "Pro")]
    r = httpx.post(f"{service.url}/v1/predict", timeout=30,
                   files=[("files", (f.name, f.read_bytes(), "image/jpeg")) for f in files])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": NAME, "version": "1", "alias": "champion"}
    assert [p["filename"] for p in body["predictions"]] == [f.name for f in files]
    for p in body["predictions"]:
        assert sum(p["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert p["label"] in ("Benign", "Early", "Pre", "Pro")
    # The same image through the shared preprocessing and onnxruntime directly.
    import onnxruntime as ort

    from leukofed.preprocessing import load_image

    model = httpx.get(f"{service.url}/v1/model").json()
    onnx_path = next(Path(service.env["LEUKOFED_INFERENCE_ONNX_CACHE_DIR"]).rglob("*.onnx"))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = load_image(files[0], model["image_size"])[None].astype(np.float32)
    direct = session.run(None, {"image": x})[0][0]
    got = list(body["predictions"][0]["probabilities"].values())
    assert got == pytest.approx(direct.tolist(), abs=1e-5)


def test_cli_predict_prints_a_table(service: ServiceProcess, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from services.inference.cli import register

    app = typer.Typer()
    register(app)
    image = tmp_path / "cell.png"
    image.write_bytes(png(1))
    result = CliRunner().invoke(app, ["predict", str(image), "--url", service.url])
    assert result.exit_code == 0, result.output
    assert "cell.png" in result.output and f"{NAME} version 1 (champion)" in result.output
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    result = CliRunner().invoke(app, ["predict", str(bad), "--url", service.url])
    assert result.exit_code == 1 and "415" in result.output


@pytest.mark.parametrize(("case", "filename", "data", "status", "message"), bad_inputs(),
                         ids=[c[0] for c in bad_inputs()])
def test_bad_input_then_a_successful_prediction(service: ServiceProcess, case: str,
                                                filename: str, data: bytes, status: int,
                                                message: str) -> None:
    with httpx.Client(base_url=service.url, timeout=30) as client:
        r = client.post("/v1/predict",
                        files={"files": (filename, data, "application/octet-stream")})
        assert r.status_code == status, r.text
        assert message in r.json()["error"]
    ok = httpx.post(f"{service.url}/v1/predict", timeout=30,
                    files={"files": ("fine.png", png(), "image/png")})
    assert ok.status_code == 200 and ok.json()["predictions"][0]["filename"] == "fine.png"


def test_triton_client_gets_the_same_probabilities_as_v1(service: ServiceProcess) -> None:
    import tritonclient.http as triton

    from leukofed.preprocessing import load_image

    data = png(7)
    v1 = httpx.post(f"{service.url}/v1/predict", files={"file": ("x.png", data, "image/png")})
    expected = list(v1.json()["predictions"][0]["probabilities"].values())

    client = triton.InferenceServerClient(service.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME)
    meta = client.get_model_metadata(NAME)
    (spec,) = meta["inputs"]
    shape = [1, *spec["shape"][1:]]
    x = load_image(data, shape[1])[None].astype(np.float32)
    for binary in (True, False):  # tritonclient's default binary tensors, and JSON
        inp = triton.InferInput(spec["name"], shape, spec["datatype"])
        inp.set_data_from_numpy(x, binary_data=binary)
        out = triton.InferRequestedOutput(meta["outputs"][0]["name"], binary_data=binary)
        result = client.infer(NAME, [inp], outputs=[out], model_version="1")
        assert result.as_numpy("probabilities")[0].tolist() == pytest.approx(expected, abs=1e-6)
        assert result.get_response()["model_version"] == "1"
    client.close()


def test_onnx_comes_from_the_registering_side_and_the_service_loads_no_tensorflow(
        service: ServiceProcess, mlflow_server, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    first = httpx.get(f"{service.url}/v1/model").json()
    # Exported and parity-checked where the version was registered, downloaded here.
    assert first["onnx_origin"] == "mlflow-artifact" and first["parity_max_abs_diff"] < 1e-4
    assert first["signature"].startswith("unchecked")  # no public key configured here
    tags = MlflowClient(mlflow_server.url).get_model_version(NAME, "1").tags
    assert tags["leukofed.onnx.sha256"] == first["onnx_sha256"]
    assert tags["leukofed.onnx.artifact_uri"].startswith(f"runs:/{first['run_id']}/")
    maps = Path(f"/proc/{service.proc.pid}/maps").read_text()
    assert "tensorflow" not in maps and "libtensorflow" not in maps  # serving needs no TF

    replica = ServiceProcess(free_port(), service_env(mlflow_server.url, tmp_path / "cache2"),
                             tmp_path / "replica.log")
    try:
        replica.start()
        replica.wait_ready(timeout=60, version="1")
        second = httpx.get(f"{replica.url}/v1/model").json()
    finally:
        replica.stop()
    assert second["onnx_origin"] == "mlflow-artifact"
    assert second["onnx_sha256"] == first["onnx_sha256"]
    assert "tf2onnx" not in replica.log()  # nothing converted on the serving side


def test_explain_and_metrics(service: ServiceProcess) -> None:
    r = httpx.post(f"{service.url}/v1/explain", files={"file": ("x.png", png(2), "image/png")},
                   timeout=30)
    assert r.status_code == 200 and r.json()["heatmap"]["method"] == "occlusion"
    text = httpx.get(f"{service.url}/metrics").text
    assert 'route="/v1/predict",status="413"' in text or 'status="413"' in text
    assert f'leukofed_model_info{{alias="champion",name="{NAME}"' in text
    assert json.loads(json.dumps(httpx.get(f"{service.url}/v2").json()))["extensions"]


def test_version_without_calibration_or_card_says_so(service: ServiceProcess) -> None:
    # Registered by leukofed before calibrations and cards: served as before, and said.
    model = httpx.get(f"{service.url}/v1/model").json()
    assert model["calibration"]["available"] is False and model["card"]["available"] is False
    p = httpx.post(f"{service.url}/v1/predict", files={"file": ("x.png", png(4), "image/png")},
                   timeout=30).json()["predictions"][0]
    assert p["calibrated"] is False and p["prediction_set"] is None
    assert p["malignant"] == ("no" if p["label"] == "Benign" else "yes")
    card = httpx.get(f"{service.url}/v1/model/card")
    assert card.status_code == 404 and "has no model card" in card.json()["error"]


def test_demanding_cuda_without_a_gpu_stops_start_up(mlflow_server, tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA provider is available here")
    env = {**service_env(mlflow_server.url, tmp_path / "cache"),
           "LEUKOFED_INFERENCE_PROVIDER": "cuda"}
    svc = ServiceProcess(free_port(), env, tmp_path / "cuda.log")
    try:
        with pytest.raises(RuntimeError, match="service exited"):
            svc.start(timeout=60)
    finally:
        svc.stop()
    assert "provider=cuda but onnxruntime offers only" in svc.log()


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def test_a_request_of_huge_blank_images_gets_413_and_memory_stays_bounded(
        mlflow_server, tmp_path: Path) -> None:
    """32 blank PNGs of 8000x8000 (187 KB each) once made the service decode ~6 GB; 32 of
    4800x4800, each under the per-file limit, add up to 737 megapixels. Both are refused
    from their headers (413, with the reason) and the service's peak RSS stays under 1 GB.
    Default limits: no model is needed, bad input is answered before one is loaded."""
    import io

    from PIL import Image

    svc = ServiceProcess(free_port(), {"LEUKOFED_INFERENCE_TRACKING_URI": mlflow_server.url,
                                       "LEUKOFED_INFERENCE_MODEL_NAME": "no-such-model",
                                       "LEUKOFED_INFERENCE_ONNX_CACHE_DIR": str(tmp_path / "c"),
                                       "LEUKOFED_INFERENCE_THREADS": "1"},
                         tmp_path / "service.log")
    try:
        svc.start()
        assert svc.proc is not None
        for side, expected in ((8000, "24000000"), (4800, "budget of 96,000,000 pixels")):
            buf = io.BytesIO()
            Image.new("RGB", (side, side), (230, 230, 230)).save(buf, format="PNG")
            blank = buf.getvalue()
            files = [("files", (f"blank-{i}.png", blank, "image/png")) for i in range(32)]
            r = httpx.post(f"{svc.url}/v1/predict", files=files, timeout=120)
            assert r.status_code == 413, r.text
            assert expected in r.json()["error"], r.text
        assert _peak_rss_mib(svc.proc.pid) < 1024
    finally:
        svc.stop()
