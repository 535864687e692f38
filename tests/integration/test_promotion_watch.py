"""Issue 26, finding 6, through a real MLflow server and the real inference service (a
process, signatures checked): the champion is served only with the aggregator's approval,
a move made like the MLflow UI makes one (``MlflowClient.set_registered_model_alias``) goes
through the release gate (the aggregator's promoter and watcher, in this process), the ONNX
file comes from the signed address whatever the tag says, and a replayed approval does not
roll the service back. Tiny ONNX models and logged model cards; nothing is trained."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import free_port
from gate_support import WEAK_CONFUSION, gate_card, log_card
from inference_support import ServiceProcess, register_onnx_version, tiny_onnx

from leukofed import approval as approvals
from leukofed import signing
from leukofed.gate import GateFloors
from registry.client import Registry
from registry.publish import TAG_URI
from services.aggregator.promotion import Promoter, PromotionWatcher

pytestmark = pytest.mark.integration

NAME = "leukofed-promotion-it"


def _served(svc: ServiceProcess) -> str | None:
    _, body = svc.get("/readyz")
    return (body.get("model") or {}).get("version")


def _stays(svc: ServiceProcess, version: str, seconds: float = 1.5) -> dict:
    """The service keeps serving ``version`` for a few polls; its /readyz body."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert _served(svc) == version, svc.log()[-2000:]
        time.sleep(0.2)
    return svc.get("/readyz")[1]


def test_attack_ui_moves_rollbacks_and_a_tampered_address_against_the_real_stack(
        mlflow_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    for var in ("MIN_MACRO_F1", "MIN_SENSITIVITY", "MIN_SPECIFICITY", "MIN_CLASS_RECALL",
                "MAX_COVERAGE_SHORTFALL", "MAX_REFER_SHARE", "MAX_FOLLOW_COLOUR"):
        monkeypatch.delenv(f"LEUKOFED_GATE_{var}", raising=False)
    signing.generate_keypair(tmp_path / "keys", "aggregator")
    key = signing.load_private_key(tmp_path / "keys" / "aggregator.key")
    client = MlflowClient(mlflow_server.url, mlflow_server.url)

    def add(seed: int, card: dict) -> str:
        version = register_onnx_version(mlflow_server.url, NAME, tiny_onnx(seed=seed),
                                        champion=False, signing_key=key)
        client.set_model_version_tag(NAME, version, "model_card",
                                     log_card(client, card, f"cards/{NAME}-{version}"))
        return version

    good, weak, later = add(1, gate_card()), add(2, gate_card(WEAK_CONFUSION)), \
        add(3, gate_card())
    promoter = Promoter(Registry(mlflow_server.url, NAME), key, tmp_path / "state",
                        floors=lambda: GateFloors())
    watcher = PromotionWatcher(promoter, ["champion"], interval_s=60)
    promoter.promote(good, "champion", "engineer")
    kept = client.get_model_version(NAME, good).tags[approvals.approval_tag("champion")]

    svc = ServiceProcess(free_port(), {
        "LEUKOFED_INFERENCE_TRACKING_URI": mlflow_server.url,
        "LEUKOFED_INFERENCE_MODEL_NAME": NAME,
        "LEUKOFED_INFERENCE_ONNX_CACHE_DIR": str(tmp_path / "cache"),
        "LEUKOFED_INFERENCE_POLL_INTERVAL_S": "0.3",
        "LEUKOFED_INFERENCE_MODEL_PUBLIC_KEY_FILE": str(tmp_path / "keys" / "aggregator.pub"),
        "LEUKOFED_INFERENCE_THREADS": "1",
    }, tmp_path / "service.log").start()
    try:
        svc.wait_ready(timeout=60, version=good)
        assert svc.get("/v1/model")[1]["signature"].startswith("verified:")

        # 1. The UI moves champion to an older, genuinely signed version that fails the
        #    gate: not served; the watcher puts the alias back, the reason in its log.
        client.set_registered_model_alias(NAME, "champion", weak)
        body = _stays(svc, good)
        assert f"version {weak} is @champion but not approved for serving" in \
            body.get("last_error", "") + svc.log()
        (decision,) = watcher.run_once()
        assert decision.action == "reverted" and decision.version == good
        assert client.get_model_version_by_alias(NAME, "champion").version == good
        assert "fails the release gate" in promoter.log.entries()[-1]["reason"]

        # 2. A version's address retagged to a local file, then moved to in the UI: the
        #    watcher approves it (it passes the gate) and the service downloads it from the
        #    signed address: the tampered one would have been refused.
        client.set_model_version_tag(NAME, later, TAG_URI, "file:///etc/hostname")
        client.set_registered_model_alias(NAME, "champion", later)
        _stays(svc, good, 1.0)  # not before the aggregator approved it
        (decision,) = watcher.run_once()
        assert decision.action == "approved"
        svc.wait_ready(timeout=30, version=later)
        assert "hostname" not in svc.log()

        # 3. The first champion's genuine approval, kept by an editor, put back and the
        #    alias moved to it: a rollback to a former approval, not served.
        client.set_model_version_tag(NAME, good, approvals.approval_tag("champion"), kept)
        client.set_registered_model_alias(NAME, "champion", good)
        assert "replay" in _stays(svc, later).get("last_error", "") + svc.log()
    finally:
        svc.stop()
    history = [(e["action"], e["version"]) for e in promoter.log.entries()]
    assert history == [("approved", good), ("reverted", good), ("approved", later)]
    assert promoter.log.verify() is None
