"""Issue 26, finding 6: rollback and an unsigned download address.

Each ``test_attack_*`` performs one attack against the real code path: a real MLflow
registry (SQLite), the aggregator's real Ed25519 key, the real promoter and watcher
(``services.aggregator.promotion``) and the inference service's real model source
(``ModelSource`` with its ``OnnxStore`` and ``ServingApprovals``: the registry read, the
signature checks, the download and an onnxruntime session), and passes only because the
attack is stopped. Tiny ONNX models, no training. Through a real MLflow server and the real
inference service: tests/integration/test_promotion_watch.py."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from gate_support import WEAK_CONFUSION, gate_card, log_card
from inference_support import tiny_onnx
from typer.testing import CliRunner

from leukofed import approval as approvals
from leukofed import signing
from leukofed.cli import app
from leukofed.gate import GateFloors
from registry.client import HISTORY_TAG, Registry
from registry.publish import TAG_SHA, TAG_SIGNATURE, TAG_URI, publish_file
from services.aggregator.promotion import REFUSED_TAG, Promoter, PromotionLog
from services.inference.model_source import ModelSource
from services.inference.onnx_files import UntrustedModel, check_artifact_uri
from services.inference.settings import InferenceSettings

NAME = "leukofed-approval-test"


class World:
    """One registry, the aggregator's keys, its promoter, and inference replicas."""

    def __init__(self, tmp: Path, template: Path) -> None:
        from mlflow import MlflowClient

        self.tmp = tmp
        shutil.copyfile(template, tmp / "mlflow.db")  # migrated once per module
        self.uri = f"sqlite:///{tmp / 'mlflow.db'}"
        self.client = MlflowClient(self.uri, self.uri)
        self.client.create_registered_model(NAME)
        signing.generate_keypair(tmp / "keys", "aggregator")
        self.key = signing.load_private_key(tmp / "keys" / "aggregator.key")
        self.registry = Registry(self.uri, NAME)
        self.promoter = Promoter(self.registry, self.key, tmp / "state",
                                 floors=lambda: GateFloors())
        exp = self.client.create_experiment("versions", artifact_location=str(tmp / "art"))
        self.experiment = exp

    def add(self, seed: int, card: str | None = "good", signed: bool = True) -> str:
        """A version published as the aggregator publishes one (signed ONNX file), with a
        model card that passes the release gate ('good'), fails it ('weak') or none."""
        run = self.client.create_run(self.experiment).info.run_id
        mv = self.client.create_model_version(NAME, f"runs:/{run}/model", run_id=run)
        path = self.tmp / f"v{mv.version}.onnx"
        path.write_bytes(tiny_onnx(seed=seed))
        publish_file(self.client, NAME, str(mv.version), run, path, "w" * 64, 0.0,
                     self.key if signed else None)
        if card is not None:
            chosen = gate_card() if card == "good" else gate_card(
                WEAK_CONFUSION, achieved=0.924, refer_share=0.25)
            self.client.set_model_version_tag(NAME, str(mv.version), "model_card", log_card(
                self.client, chosen, f"cards/v{mv.version}"))
        return str(mv.version)

    def replica(self, name: str = "a", **extra: Any) -> ModelSource:
        settings = InferenceSettings(
            tracking_uri=self.uri, model_name=NAME, onnx_cache_dir=self.tmp / name,
            model_public_key_file=self.tmp / "keys" / "aggregator.pub", threads=1,
            **extra)
        return ModelSource(settings)

    def alias(self) -> str | None:
        info = self.registry.alias("champion")
        return info.version if info else None

    def tag(self, version: str, key: str) -> str | None:
        return self.client.get_model_version(NAME, version).tags.get(key)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, its schema migrated once (seconds each time)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    uri = f"sqlite:///{path}"
    MlflowClient(uri, uri).search_registered_models()
    return path


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template: Path) -> World:
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands here
    for var in ("MIN_MACRO_F1", "MIN_SENSITIVITY", "MIN_SPECIFICITY", "MIN_CLASS_RECALL",
                "MAX_COVERAGE_SHORTFALL", "MAX_REFER_SHARE", "MAX_FOLLOW_COLOUR"):
        monkeypatch.delenv(f"LEUKOFED_GATE_{var}", raising=False)
    monkeypatch.delenv("LEUKOFED_MAX_FOLLOW_COLOUR", raising=False)
    monkeypatch.delenv("LEUKOFED_AGGREGATOR_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("LEUKOFED_AGGREGATOR_ADMIN_TOKEN_FILE", raising=False)
    return World(tmp_path, template)


def served(source: ModelSource) -> str | None:
    source.refresh()
    return source.current.version if source.current else None


# ------------------------------------------------------------------ the statement itself


def test_an_approval_names_one_version_alias_and_file_and_expires() -> None:
    key = signing.Ed25519PrivateKey.generate()
    pub = key.public_key()
    found, text = approvals.make_approval(key, model="m", version="3", alias="champion",
                                          onnx_sha256="ab" * 32, approved_by="engineer",
                                          seq=7, ttl_s=100, now=1000.0)
    got = approvals.check_approval(pub, text, model="m", version="3", alias="champion",
                                   onnx_sha256="ab" * 32, min_seq=7, now=1050.0)
    assert got == found and got.seq == 7 and got.approved_by == "engineer"
    for kwargs, reason in (({"version": "4"}, "other_version"),
                           ({"alias": "candidate"}, "other_version"),
                           ({"onnx_sha256": "cd" * 32}, "other_version"),
                           ({"now": 1100.0}, "expired"), ({"min_seq": 8}, "replay")):
        args = {"model": "m", "version": "3", "alias": "champion", "onnx_sha256": "ab" * 32,
                "min_seq": 0, "now": 1050.0, **kwargs}
        with pytest.raises(approvals.NotApproved) as err:
            approvals.check_approval(pub, text, **args)
        assert err.value.reason == reason, kwargs


# ------------------------------------------------------------------ the attacks


def test_attack_champion_pointed_at_an_old_signed_version_is_not_served_and_is_put_back(
        world: World) -> None:
    """The old version's ONNX signature is genuine and stays valid; it was never approved.
    Moved there with the registry's own API (what the MLflow UI does), it is not served,
    and the watcher puts the alias back, reason recorded in the log and on the version."""
    old = world.add(1, card="weak")  # an abandoned round, signed like every round
    good = world.add(2)
    world.promoter.promote(good, "champion", "engineer")
    replica = world.replica()
    assert served(replica) == good

    world.client.set_registered_model_alias(NAME, "champion", old)  # the attack
    assert served(replica) == good  # not served: no approval
    assert f"version {old} is @champion but not approved for serving" in replica.last_error
    assert "unsigned" in replica.last_error

    decision = world.promoter.check("champion")  # the aggregator's watcher, one look
    assert decision.action == "reverted" and decision.version == good
    assert world.alias() == good
    last = world.promoter.log.entries()[-1]
    assert last["action"] == "reverted" and last["refused_version"] == old
    assert "fails the release gate" in last["reason"] and "macro_f1" in last["reason"]
    assert "fails the release gate" in json.loads(world.tag(old, REFUSED_TAG))["reason"]
    assert served(replica) == good


def test_attack_replayed_or_forged_approval_is_refused(world: World) -> None:
    """An editor keeps version 1's genuine approval and, after version 2 is approved, puts
    it back and moves the alias to version 1 (a rollback to a former approval); or copies
    it onto another version; or signs one with a key of their own."""
    v1, v2, v3 = world.add(1), world.add(2), world.add(3)
    world.promoter.promote(v1, "champion", "engineer")
    kept = world.tag(v1, approvals.approval_tag("champion"))
    replica = world.replica()
    assert served(replica) == v1
    world.promoter.promote(v2, "champion", "engineer")
    assert served(replica) == v2
    assert world.tag(v1, approvals.approval_tag("champion")) is None  # removed on the move

    tag = approvals.approval_tag("champion")
    world.client.set_model_version_tag(NAME, v1, tag, kept)  # the replay
    world.client.set_registered_model_alias(NAME, "champion", v1)
    assert served(replica) == v2
    assert "replay" in replica.last_error and "rollback" in replica.last_error
    restarted = world.replica()  # same cache folder: the newest approval seen is kept
    assert served(restarted) is None and "replay" in restarted.status

    world.client.set_model_version_tag(NAME, v3, tag, kept)  # another version's approval
    world.client.set_registered_model_alias(NAME, "champion", v3)
    assert served(replica) == v2 and "other_version" in replica.last_error

    rogue = signing.Ed25519PrivateKey.generate()  # a forged one: the editor's own key
    sha = world.tag(v3, TAG_SHA)
    _, forged = approvals.make_approval(rogue, model=NAME, version=v3, alias="champion",
                                        onnx_sha256=sha, approved_by="engineer",
                                        seq=10**9)
    world.client.set_model_version_tag(NAME, v3, tag, forged)
    assert served(replica) == v2 and "forged" in replica.last_error

    _, expired = approvals.make_approval(world.key, model=NAME, version=v3, alias="champion",
                                         onnx_sha256=sha, approved_by="x", seq=10**9,
                                         ttl_s=100, now=time.time() - 200)
    world.client.set_model_version_tag(NAME, v3, tag, expired)  # a genuine, expired one
    assert served(world.replica("fresh")) is None


def test_attack_rewritten_history_tag_changes_nothing_the_aggregator_keeps(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """`leukofed.alias_history` is a registry tag editors can rewrite; the promotion log is
    the aggregator's, and `leukofed promote --history` reads that."""
    v1 = world.add(1)
    world.promoter.promote(v1, "champion", "engineer", {"gate": "passed"})
    world.client.set_registered_model_tag(NAME, HISTORY_TAG, json.dumps(
        [{"alias": "champion", "version": "99", "by": "nobody", "gate": "passed"}]))
    monkeypatch.setenv("LEUKOFED_AGGREGATOR_STATE_DIR", str(world.tmp / "state"))
    result = CliRunner().invoke(app, ["promote", "--history"])
    assert result.exit_code == 0, result.output
    assert "#1 " in result.output and f"approved version {v1} (from none) by engineer" \
        in result.output
    assert "99" not in result.output and "nobody" not in result.output
    assert "log intact" in result.output

    # The log is the aggregator's own file; should a line still be edited, it shows.
    path = PromotionLog(world.tmp / "state").path
    world.promoter.promote(world.add(2), "champion", "engineer")
    lines = path.read_text().splitlines()
    path.write_text(lines[0].replace("engineer", "someone else") + "\n" + lines[1] + "\n")
    result = CliRunner().invoke(app, ["promote", "--history"])
    assert result.exit_code == 1 and "the promotion log was altered: line 2" in result.output


def test_attack_artifact_address_tampered_to_a_local_file_is_never_fetched(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The `leukofed.onnx.artifact_uri` tag rewritten to file:///etc/hostname: the address
    is taken from the signed claims, so the file is never fetched; without keys
    (development mode) the tag is used but its scheme must be allowed."""
    import mlflow.artifacts

    fetched: list[str] = []
    real = mlflow.artifacts.download_artifacts

    def spy(artifact_uri: str, **kwargs: Any) -> str:
        fetched.append(artifact_uri)
        return real(artifact_uri=artifact_uri, **kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", spy)
    version = world.add(1)
    signed_uri = world.tag(version, TAG_URI)
    world.client.set_model_version_tag(NAME, version, TAG_URI, "file:///etc/hostname")
    world.promoter.promote(version, "champion", "engineer")
    replica = world.replica()
    assert served(replica) == version
    assert fetched == [signed_uri] and not any(u.startswith("file:") for u in fetched)

    dev = ModelSource(InferenceSettings(tracking_uri=world.uri, model_name=NAME,
                                        onnx_cache_dir=world.tmp / "dev", threads=1))
    assert served(dev) is None
    assert f"version {version} refused" in dev.refused[version]
    assert "scheme 'file' is not one of runs, models, mlflow-artifacts" in dev.refused[version]
    assert len(fetched) == 1
    for bad in ("http://evil.example/x.onnx", "/etc/hostname", "s3://b/k",
                "runs:/abc/../../../etc/hostname"):
        with pytest.raises(UntrustedModel):
            check_artifact_uri(bad)


def test_a_signature_without_an_address_downloads_from_the_published_layout(
        world: World) -> None:
    """Versions signed before the address was in the claims: the address is rebuilt from
    the version's own MLflow run and the fixed folder, never read from the tag."""
    version = world.add(1)
    tags = world.client.get_model_version(NAME, version).tags
    claims = signing.verify_model(world.key.public_key(), tags[TAG_SIGNATURE], NAME, version,
                                  tags[TAG_SHA])
    assert claims["artifact_uri"] == tags[TAG_URI]
    old_style = signing.sign_model(world.key, NAME, version, tags[TAG_SHA], "w" * 64)
    world.client.set_model_version_tag(NAME, version, TAG_SIGNATURE, old_style)
    world.client.set_model_version_tag(NAME, version, TAG_URI, "file:///etc/hostname")
    world.promoter.promote(version, "champion", "engineer")
    assert served(world.replica()) == version


def test_attack_alias_moved_in_the_ui_goes_through_the_release_gate(world: World) -> None:
    """A move made with `MlflowClient.set_registered_model_alias` (what the MLflow UI does):
    to a version that passes the gate, the watcher signs its approval and it is served; to
    one that fails, it is put back; with no approved version before, the alias is removed."""
    first_weak = world.add(1, card="weak")
    world.client.set_registered_model_alias(NAME, "champion", first_weak)
    replica = world.replica()
    assert served(replica) is None
    assert world.promoter.check("champion").action == "removed"
    assert world.alias() is None
    assert world.promoter.log.entries()[-1]["refused_version"] == first_weak

    good = world.add(2)
    world.client.set_registered_model_alias(NAME, "champion", good)  # a UI promotion
    assert served(replica) is None  # not before the aggregator approved it
    decision = world.promoter.check("champion")
    assert decision.action == "approved" and decision.version == good
    entry = world.promoter.log.entries()[-1]
    assert entry["via"] == "watcher" and entry["by"].startswith("unknown: moved outside")
    assert entry["gate"] == "passed"
    assert served(replica) == good
    assert world.promoter.check("champion").action == "none"  # nothing moved since

    unsigned = world.add(3, signed=False)  # passes the gate on paper, but not signed
    world.client.set_registered_model_alias(NAME, "champion", unsigned)
    decision = world.promoter.check("champion")
    assert decision.action == "reverted" and world.alias() == good
    assert "no ONNX file signed by this aggregator" in decision.reason


def test_the_watcher_renews_and_restores_the_current_approval(world: World) -> None:
    clock = [time.time()]
    promoter = Promoter(world.registry, world.key, world.tmp / "state", ttl_s=1000,
                        floors=lambda: GateFloors(), clock=lambda: clock[0])
    version = world.add(1)
    first = promoter.promote(version, "champion", "engineer", {"gate": "overridden",
                                                                "reason": "pilot"})
    tag = approvals.approval_tag("champion")
    world.client.delete_model_version_tag(NAME, version, tag)  # an editor removes it
    assert promoter.check("champion").action == "restored"
    assert world.tag(version, tag) == first["approval"]
    clock[0] += 600  # past half its life
    assert promoter.check("champion").action == "renewed"
    renewed = promoter.log.entries()[-1]
    assert renewed["seq"] == first["seq"] + 1 and renewed["gate"] == "overridden"
    assert renewed["by"] == "engineer" and renewed["via"] == "renewal"
    assert world.tag(version, tag) == renewed["approval"]
    assert promoter.log.verify() is None


def test_promote_through_the_aggregator_api_signs_and_logs(world: World) -> None:
    """POST /v1/promotions runs the gate with the caller's floors, refuses a failing
    version unless forced with a reason, and signs what it promotes."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from services.aggregator.routers import promotions

    api = FastAPI()
    api.include_router(promotions.router)
    api.state.promoter = world.promoter
    http = TestClient(api)
    weak, good = world.add(1, card="weak"), world.add(2)
    refused = http.post("/v1/promotions", json={"version": weak, "by": "engineer"})
    assert refused.status_code == 409 and "fails the release gate" in refused.text
    assert http.post("/v1/promotions", json={"version": weak, "force": True}
                     ).status_code == 422
    wrong = http.post("/v1/promotions", json={"version": good, "model": "other"})
    assert wrong.status_code == 409
    done = http.post("/v1/promotions", json={"version": good, "by": "engineer"})
    assert done.status_code == 200, done.text
    assert done.json()["by"] == "engineer (aggregator admin token)"
    forced = http.post("/v1/promotions", json={"version": weak, "force": True,
                                               "reason": "pilot site"}).json()
    assert forced["gate"] == "overridden" and forced["reason"] == "pilot site"
    assert world.alias() == weak
    assert world.promoter.check("champion").action == "none"  # an override stays
    log = http.get("/v1/promotions").json()
    assert log["intact"] and [e["version"] for e in log["entries"]] == [good, weak]


def test_leukofed_promote_with_the_admin_token_is_made_by_the_aggregator(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """`leukofed promote` shows the card and gate here, then asks the aggregator (admin
    token) to move and sign; `--history` reads the aggregator's log through its API."""
    import httpx
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from services.aggregator.routers import promotions

    api = FastAPI()
    api.include_router(promotions.router)
    api.state.promoter = world.promoter
    http = TestClient(api)
    sent: list[tuple[str, str]] = []

    def request(method: str, url: str, timeout: float = 0, **kwargs: Any) -> httpx.Response:
        sent.append((method, url))
        assert kwargs["headers"]["Authorization"] == "Bearer t0ken"
        return http.request(method, httpx.URL(url).path, json=kwargs.get("json"))

    monkeypatch.setattr(httpx, "request", request)
    monkeypatch.setenv("LEUKOFED_AGGREGATOR_ADMIN_TOKEN", "t0ken")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "engineer")
    version = world.add(1)
    result = CliRunner().invoke(app, ["promote", version, "--model-name", NAME,
                                      "--url", "http://agg:8001"])
    assert result.exit_code == 0, result.output
    assert f"version {version} is now @champion" in result.output
    assert "approved for serving by the aggregator: seq 1, by engineer" in result.output
    assert sent == [("POST", "http://agg:8001/v1/promotions")]
    assert world.alias() == version and world.tag(version, approvals.approval_tag("champion"))
    history = CliRunner().invoke(app, ["promote", "--history", "--url", "http://agg:8001"])
    assert history.exit_code == 0 and f"approved version {version}" in history.output
