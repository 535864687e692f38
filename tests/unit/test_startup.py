"""Fail closed (leukofed.startup): each service refuses to start without its keys and
token outside development mode, says why in one line, and refuses change-me always."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from leukofed import signing, startup
from leukofed.startup import DEV_MODE_ENV, StartupRefused

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def production(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite runs in development mode (tests/conftest.py); these tests leave it."""
    monkeypatch.delenv(DEV_MODE_ENV, raising=False)
    for key in list(os.environ):
        if key.startswith(("LEUKOFED_AGGREGATOR_", "LEUKOFED_INFERENCE_", "LEUKOFED_CLIENT_")):
            monkeypatch.delenv(key)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    signing.generate_keypair(folder, "aggregator")
    signing.generate_keypair(folder, "a")
    (folder / "hospitals").mkdir()
    (folder / "hospitals" / "a.pub").write_bytes((folder / "a.pub").read_bytes())
    return folder


def test_enforce_refuses_missing_protection_in_one_line_unless_dev_mode() -> None:
    problems = ["no admin token", None, "no signing key"]
    with pytest.raises(StartupRefused) as err:
        startup.enforce("svc", problems, environ={})
    message = str(err.value)
    assert "\n" not in message and "no admin token; no signing key" in message
    assert DEV_MODE_ENV in message
    assert startup.enforce("svc", problems, environ={DEV_MODE_ENV: "1"}) == [
        "no admin token", "no signing key"]
    assert startup.enforce("svc", [None], environ={}) == []
    assert not startup.dev_mode({DEV_MODE_ENV: "0"}) and startup.dev_mode({DEV_MODE_ENV: "on"})


def test_change_me_is_refused_even_in_dev_mode() -> None:
    secrets = {"BROKER_URL": "redis://hospital-a:change-me@redis:6379/0", "TOKEN": "s3cret"}
    with pytest.raises(StartupRefused, match="BROKER_URL still hold the 'change-me'"):
        startup.enforce("svc", [], secrets, environ={DEV_MODE_ENV: "1"})
    # Every service checks the MLflow password it may take from the environment too.
    with pytest.raises(StartupRefused, match="MLFLOW_TRACKING_PASSWORD still hold"):
        startup.enforce("svc", [], environ={DEV_MODE_ENV: "1",
                                            "MLFLOW_TRACKING_PASSWORD": "change-me"})


def test_broker_without_tls_is_a_problem_only_off_this_machine() -> None:
    assert startup.broker_problem("redis://u:p@redis:6379/0")
    assert startup.broker_problem("rediss://u:p@redis:6379/0") is None
    assert startup.broker_problem("redis://127.0.0.1:6379/0") is None
    assert startup.broker_problem("redis://localhost/0") is None


def test_inference_refuses_without_api_key_and_public_key(production: None, keys: Path,
                                                          tmp_path: Path) -> None:
    from services.inference.app import create_app
    from services.inference.settings import InferenceSettings

    with pytest.raises(StartupRefused) as err:
        create_app(InferenceSettings(onnx_cache_dir=tmp_path))
    assert "no API key" in str(err.value) and "no aggregator public key" in str(err.value)
    with pytest.raises(StartupRefused, match="no aggregator public key"):
        create_app(InferenceSettings(onnx_cache_dir=tmp_path, api_key="k" * 24))
    with pytest.raises(StartupRefused, match="LEUKOFED_INFERENCE_API_KEY still hold"):
        create_app(InferenceSettings(onnx_cache_dir=tmp_path, api_key="change-me",
                                     model_public_key_file=keys / "aggregator.pub"))
    create_app(InferenceSettings(onnx_cache_dir=tmp_path, api_key="k" * 24,
                                 model_public_key_file=keys / "aggregator.pub"))


def test_aggregator_refuses_without_token_and_keys(production: None, keys: Path,
                                                   tmp_path: Path) -> None:
    from services.aggregator.app import create_app
    from services.aggregator.settings import AggregatorSettings

    bare = AggregatorSettings(state_dir=tmp_path, broker_url="redis://agg:pw@redis:6379/0")
    with pytest.raises(StartupRefused) as err:
        create_app(bare)
    for what in ("no admin token", "no signing key", "no hospital public keys", "rediss://"):
        assert what in str(err.value)
    token_file = tmp_path / "token"
    token_file.write_text("change-me\n")
    with pytest.raises(StartupRefused, match="ADMIN_TOKEN still hold"):
        create_app(AggregatorSettings(state_dir=tmp_path, admin_token_file=token_file,
                                      signing_key_file=keys / "aggregator.key",
                                      hospital_keys_dir=keys / "hospitals"))
    create_app(AggregatorSettings(state_dir=tmp_path, admin_token="t" * 32,
                                  signing_key_file=keys / "aggregator.key",
                                  hospital_keys_dir=keys / "hospitals"))


def test_hospital_worker_refuses_without_keys(
        production: None, keys: Path, tmp_path: Path) -> None:
    from services.client.settings import ClientSettings
    from services.client.worker import create_app

    (tmp_path / "data").mkdir()
    base = {"hospital_id": "a", "data_dir": tmp_path / "data"}
    with pytest.raises(StartupRefused) as err:
        create_app(ClientSettings(**base))
    assert "no signing key" in str(err.value) and "no aggregator public key" in str(err.value)
    signed = {**base, "signing_key_file": keys / "a.key",
              "aggregator_public_key_file": keys / "aggregator.pub"}
    create_app(ClientSettings(**signed))


def test_trusted_hosts(production: None, keys: Path, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    from services.inference.app import create_app
    from services.inference.settings import InferenceSettings

    settings = {"onnx_cache_dir": tmp_path, "api_key": "k" * 24,
                "model_public_key_file": keys / "aggregator.pub"}
    app = create_app(InferenceSettings(**settings))
    client = TestClient(app, base_url="http://127.0.0.1")
    assert client.get("/healthz").status_code == 200
    evil = client.get("/healthz", headers={"host": "attacker.example"})
    assert evil.status_code == 400  # a DNS-rebinding page cannot reach the API
    named = TestClient(create_app(InferenceSettings(**settings, allowed_hosts="inference")),
                       base_url="http://inference")
    assert named.get("/healthz").status_code == 200
    monkeypatch.setenv(DEV_MODE_ENV, "1")
    assert startup.allowed_hosts("") == ["*"]


def test_services_say_why_in_one_line_and_dev_mode_is_the_way_around(
        production: None, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != DEV_MODE_ENV}
    env.update(LEUKOFED_INFERENCE_ONNX_CACHE_DIR=str(tmp_path),
               LEUKOFED_INFERENCE_TRACKING_URI="http://127.0.0.1:9", LEUKOFED_INFERENCE_PORT="9")
    done = subprocess.run([sys.executable, "-m", "services.inference"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("inference: refusing to start without protection: no API key")
    assert "Traceback" not in done.stderr
    leukofed = str(Path(sys.executable).parent / "leukofed")
    agg = subprocess.run([leukofed, "aggregator", "serve"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert agg.returncode == 2 and "aggregator: refusing to start" in agg.stderr
    assert "Traceback" not in agg.stderr
