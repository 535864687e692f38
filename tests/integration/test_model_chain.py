"""The signed model chain, with a real MLflow server and the real inference service.

1. The service holds the aggregator's public key: a signed version is served and says so;
   an unsigned one, or a signed one retagged to another ONNX file, is refused with the
   reason while the previous champion keeps serving; a fresh service whose champion is
   forged is not ready and says why.
2. MLflow with basic auth: a hospital's (read-only) user cannot move an alias, the ML
   engineer's can, and `leukofed promote` works (and fails clearly) with those credentials.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import VENV_BIN, free_port, running_mlflow
from inference_support import ServiceProcess, register_onnx_version, tiny_onnx

from leukofed import signing
from registry.publish import TAG_SHA, TAG_URI

pytestmark = pytest.mark.integration

NAME = "leukofed-chain-it"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    signing.generate_keypair(folder, "aggregator")
    return folder


def _service(mlflow_server, keys: Path, tmp: Path) -> ServiceProcess:
    return ServiceProcess(free_port(), {
        "LEUKOFED_INFERENCE_TRACKING_URI": mlflow_server.url,
        "LEUKOFED_INFERENCE_MODEL_NAME": NAME,
        "LEUKOFED_INFERENCE_ONNX_CACHE_DIR": str(tmp / "cache"),
        "LEUKOFED_INFERENCE_POLL_INTERVAL_S": "0.3",
        "LEUKOFED_INFERENCE_MODEL_PUBLIC_KEY_FILE": str(keys / "aggregator.pub"),
        "LEUKOFED_INFERENCE_THREADS": "1",
    }, tmp / "service.log")


def _wait_refused(svc: ServiceProcess, version: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = svc.get("/readyz")
        if version in body.get("refused_versions", {}):
            return body
        time.sleep(0.2)
    raise AssertionError(f"version {version} not refused: {body}\n{svc.log()}")


def test_only_versions_signed_by_the_aggregator_are_served(
        mlflow_server, keys: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    key = signing.load_private_key(keys / "aggregator.key")
    client = MlflowClient(mlflow_server.url, mlflow_server.url)
    v1 = register_onnx_version(mlflow_server.url, NAME, tiny_onnx(seed=1),
                               signing_key=key)
    svc = _service(mlflow_server, keys, tmp_path / "a").start()
    try:
        svc.wait_ready(timeout=60, version=v1)
        status, model = svc.get("/v1/model")
        assert status == 200 and model["signature"].startswith(
            "verified: signed by the aggregator"), model

        # An unsigned version promoted: refused with the reason, version 1 keeps serving.
        v2 = register_onnx_version(mlflow_server.url, NAME, tiny_onnx(seed=2))
        body = _wait_refused(svc, v2)
        assert "unsigned" in body["refused_versions"][v2]
        assert body["ready"] and body["model"]["version"] == v1

        # A signed version retagged to the unsigned version's file: refused as forged.
        v3 = register_onnx_version(mlflow_server.url, NAME, tiny_onnx(seed=3),
                                   champion=False, signing_key=key)
        other = client.get_model_version(NAME, v2).tags
        client.set_model_version_tag(NAME, v3, TAG_URI, other[TAG_URI])
        client.set_model_version_tag(NAME, v3, TAG_SHA, other[TAG_SHA])
        client.set_registered_model_alias(NAME, "champion", v3)
        body = _wait_refused(svc, v3)
        assert "not the file the aggregator signed" in body["refused_versions"][v3]
        assert "forged" in body["refused_versions"][v3]
        assert body["model"]["version"] == v1
        image = tiny_png()
        r = httpx.post(f"{svc.url}/v1/predict", files={"file": ("a.png", image, "image/png")})
        assert r.status_code == 200 and r.json()["model"]["version"] == v1
        assert f"version {v3} refused" in svc.log()

        # A fresh replica whose champion is the forged version: not ready, and says why.
        fresh = _service(mlflow_server, keys, tmp_path / "b").start()
        try:
            body = _wait_refused(fresh, v3)
            status, _ = fresh.get("/readyz")
            assert status == 503 and not body["ready"]
            assert "not the file the aggregator signed" in body["status"]
            assert fresh.get("/v1/model")[0] == 503
        finally:
            fresh.stop()
    finally:
        svc.stop()


def tiny_png() -> bytes:
    from inference_support import encode, noise_image

    return encode(noise_image(32, 1), "PNG")


# ------------------------------------------------------------------ MLflow with basic auth

ADMIN_PASSWORD = "admin-password-for-tests"  # noqa: S105 (a throwaway test server)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server --app-name basic-auth`` (default permission READ), as in compose."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    ini = root / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{root / 'auth.db'}\nadmin_username = admin\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini),
           "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret"}
    with running_mlflow(root, "--app-name", "basic-auth", env=env) as url:
        yield url


def _as(user: str, password: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


def _promote(url: str, user: str, password: str, version: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": user,
           "MLFLOW_TRACKING_PASSWORD": password, "LEUKOFED_AGGREGATOR_MODEL_NAME": NAME}
    # Tiny ONNX versions carry no model card: past the release gate only with a reason.
    return subprocess.run([str(VENV_BIN / "leukofed"), "promote", version, "--force",
                           "--reason", "test: a tiny model, the permissions under test"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_with_mlflow_auth_a_hospital_cannot_move_the_champion(
        auth_server: str, keys: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    from registry.client import Registry
    from registry.users import ensure_users

    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server)
    _as("admin", ADMIN_PASSWORD, monkeypatch)
    admin = get_app_client("basic-auth", tracking_uri=auth_server)
    passwords = {u: f"{u}-password-1234" for u in ("aggregator", "engineer", "hospital-a")}
    # What compose's mlflow-users service runs; again at the next `up`: idempotent.
    assert ensure_users(auth_server, passwords)[0] == "created user aggregator"
    assert ensure_users(auth_server, passwords)[0] == "user aggregator exists; password set"

    # The aggregator registers (and owns) the model; the engineer is granted EDIT on it.
    _as("aggregator", passwords["aggregator"], monkeypatch)
    key = signing.load_private_key(keys / "aggregator.key")
    v1 = register_onnx_version(auth_server, NAME, tiny_onnx(seed=1),
                               champion=True, signing_key=key)
    v2 = register_onnx_version(auth_server, NAME, tiny_onnx(seed=2),
                               champion=False, signing_key=key)
    _as("admin", ADMIN_PASSWORD, monkeypatch)
    admin.grant_user_permission("engineer", "registered_model", NAME, "EDIT")

    # A hospital reads, but cannot move the alias: neither through the API...
    _as("hospital-a", passwords["hospital-a"], monkeypatch)
    hospital = MlflowClient(auth_server, auth_server)
    assert hospital.get_model_version_by_alias(NAME, "champion").version == v1
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|Permission denied"):
        hospital.set_registered_model_alias(NAME, "champion", v2)
    # ...nor with `leukofed promote`, which says why in one line.
    done = _promote(auth_server, "hospital-a", passwords["hospital-a"], v2)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "MLflow refused to move @champion" in done.stderr
    assert "Traceback" not in done.stderr
    assert hospital.get_model_version_by_alias(NAME, "champion").version == v1

    # The ML engineer can, and the move is recorded with who made it and the signed digest.
    done = _promote(auth_server, "engineer", passwords["engineer"], v2)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "aggregator signature: present" in done.stdout
    assert hospital.get_model_version_by_alias(NAME, "champion").version == v2
    last = Registry(auth_server, NAME).alias_history()[-1]
    assert last["by"] == "engineer" and last["version"] == v2 and last["from"] == v1
    assert last["gate"] == "overridden" and last["reason"].startswith("test: a tiny model")
    assert last["onnx_sha256"] == hospital.get_model_version(NAME, v2).tags[TAG_SHA]


def test_the_version_run_holds_an_onnx_flavored_mlflow_model_of_the_signed_bytes(
        mlflow_server, keys: Path, tmp_path: Path) -> None:
    """What the aggregator publishes is an MLflow model (onnx flavor, signature, input
    example) that MLflow-aware tools can load, and its model file is the file the
    aggregator signed and the inference service downloads."""
    import hashlib

    import mlflow.onnx
    import numpy as np
    import yaml
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    key = signing.load_private_key(keys / "aggregator.key")
    client = MlflowClient(mlflow_server.url, mlflow_server.url)
    version = register_onnx_version(mlflow_server.url, "flavored", tiny_onnx(seed=4),
                                    champion=False, signing_key=key)
    tags = client.get_model_version("flavored", version).tags
    model_uri = tags[TAG_URI].rsplit("/", 1)[0]  # the folder of the MLflow model
    local = Path(download_artifacts(artifact_uri=model_uri, dst_path=str(tmp_path),
                                    tracking_uri=mlflow_server.url))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert "onnx" in mlmodel["flavors"] and "python_function" in mlmodel["flavors"]
    assert mlmodel["signature"]["inputs"] and mlmodel["signature"]["outputs"]
    assert (local / mlmodel["saved_input_example_info"]["artifact_path"]).is_file()
    model_file = local / mlmodel["flavors"]["onnx"]["data"]
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert digest == tags[TAG_SHA]
    assert tags[TAG_URI].endswith("/" + model_file.name)  # what the service downloads
    signing.verify_model(signing.load_public_key(keys / "aggregator.pub"),
                         tags["leukofed.signature"], "flavored", version, digest)
    # MLflow's own loader serves it: four class probabilities for one image.
    pyfunc = mlflow.pyfunc.load_model(str(local))
    out = pyfunc.predict(np.zeros((1, 32, 32, 3), np.float32))
    probs = np.asarray(out["probabilities"] if isinstance(out, dict) else out)
    assert probs.shape[-1] == 4 and np.allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert mlflow.onnx.load_model(str(local)).graph.input[0].name
