"""The hospital client without Celery: tasks, audit log, pause switch, and what leaves."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import msgpack
import pytest
import typer
from typer.testing import CliRunner

from leukofed.protocol import RoundConfig
from leukofed.wire import decode_weights, encode_weights
from services.client.audit import ParticipationLog, PauseSwitch
from services.client.cli import register
from services.client.hospital import HospitalClient
from services.client.settings import ClientSettings

CFG = {"run_id": "r1", "round": 1, "model": "compact_cnn", "image_size": 32,
       "batch_size": 8, "jit_compile": False}


@pytest.fixture
def client(tmp_path: Path, synthetic_dataset) -> HospitalClient:
    data = synthetic_dataset(per_class=8)
    settings = ClientSettings(hospital_id="a", data_dir=data, state_dir=tmp_path / "state",
                              cache_dir=tmp_path / "cache", block_size=2)
    return HospitalClient(settings)


@pytest.fixture
def global_blob() -> bytes:
    from leukofed.models import build_model
    from leukofed.wire import weights_from_model

    return encode_weights(weights_from_model(build_model("compact_cnn", 32, seed=0)))


def test_fit_evaluate_describe_send_only_aggregates(client: HospitalClient,
                                                    global_blob: bytes) -> None:
    fit = client.fit(global_blob, CFG)
    assert fit["status"] == "ok" and fit["num_examples"] > 0
    update = decode_weights(fit["weights"])
    assert update.keys() == decode_weights(global_blob).keys()
    assert fit["bytes"] == len(fit["weights"])
    evaluation = client.evaluate(fit["weights"], CFG)
    assert evaluation["status"] == "ok" and evaluation["splits"]["test"]["n"] > 0
    described = client.describe()
    assert sum(described["class_counts"].values()) == 32
    # Nothing names an image: no path, no file name anywhere in what the tasks return.
    for answer in (fit, evaluation, described):
        wire = msgpack.packb(answer, use_bin_type=True)
        assert b"img-" not in wire and b".png" not in wire
        assert str(client.settings.data_dir).encode() not in wire
    # What the training images look like leaves only as aggregate numbers of fixed size:
    # sufficient statistics of the acquisition profile and per-class stain sums.
    from leukofed.ood import DESCRIPTORS, ProfileStats

    stats = ProfileStats.from_dict(fit["acquisition"])
    assert stats.count == fit["num_examples"]
    assert stats.outer.shape == (len(DESCRIPTORS), len(DESCRIPTORS))
    assert sum(fit["stain_sums"]["counts"]) == fit["num_examples"]
    assert len(msgpack.packb({k: fit[k] for k in ("acquisition", "stain_sums")})) < 8000
    # Calibration leaves as sums over each split (fixed size, whatever the split's size):
    # the aggregator fits the temperature and the conformal thresholds from them.
    from leukofed.calibration import validate_sums

    for split in ("val", "test"):
        s = evaluation["splits"][split]
        if s["n"]:
            sums = validate_sums(s["calibration"])
            assert sums["count"] == s["n"]
    size = len(msgpack.packb(evaluation["splits"]["test"]["calibration"], use_bin_type=True))
    assert size < 400_000, size
    private = client.fit(global_blob, {**CFG, "round": 2, "send_profile": False})
    assert "acquisition" not in private and "stain_sums" not in private  # DP runs
    entries = list(client.participation.entries())
    assert [e["task"] for e in entries] == ["fit", "evaluate", "fit"]
    assert entries[0]["sha256"] == fit["sha256"] and entries[0]["bytes"] == fit["bytes"]


def test_evaluate_sends_membership_histograms_never_per_image_losses(
        client: HospitalClient, global_blob: bytes) -> None:
    """The membership audit (leukofed.membership): histograms on fixed bins of the loss on
    a fixed sample of training images and on the val and test images; from the reference
    round on, also of the loss relative to the reference round's, kept at the hospital."""
    import numpy as np

    from leukofed.membership import ATTACKS, validate_histograms

    cfg = {**CFG, "membership_images": 10}
    first = client.evaluate(global_blob, cfg)
    held_out = first["splits"]["val"]["n"] + first["splits"]["test"]["n"]
    hist = validate_histograms(first["membership"], max_members=10, max_nonmembers=held_out)
    assert set(hist) == {"loss"}  # round 1 is the reference: nothing to compare with yet
    assert hist["loss"]["members"].sum() == 10 and hist["loss"]["nonmembers"].sum() == held_out
    second = client.evaluate(global_blob, {**cfg, "round": 2})
    assert second["membership"]["reference_round"] == 1
    hist = validate_histograms(second["membership"])
    assert set(hist) == set(ATTACKS)
    # The same weights as the reference: every image's loss ratio is 1, one bin holds all.
    assert hist["loss_ratio"]["members"].max() == 10
    assert hist["loss_ratio"]["nonmembers"].max() == held_out
    # Fixed size whatever the number of images; no float anywhere (counts only).
    wire = msgpack.packb(second["membership"], use_bin_type=True)
    assert len(wire) < 4 * sum(b for _, _, b in ATTACKS.values()) + 200
    assert not any(isinstance(v, float) for a in second["membership"]["attacks"].values()
                   for side in a.values() for v in side)
    assert np.isfinite(hist["loss"]["members"]).all()
    assert "membership" not in client.evaluate(global_blob, {**CFG, "round": 3})  # not asked
    logged = [e for e in client.participation.entries() if e["task"] == "evaluate"]
    assert [e.get("membership_histograms") for e in logged] == [
        ["loss"], ["loss", "loss_ratio"], None]


def test_paused_and_expired_tasks_are_declined(client: HospitalClient, global_blob: bytes
                                               ) -> None:
    client.pause_switch.pause("audit")
    answer = client.fit(global_blob, CFG)
    assert answer["status"] == "declined" and answer["message"] == "declined: paused"
    client.pause_switch.resume()
    answer = client.fit(global_blob, {**CFG, "deadline": time.time() - 1})
    assert answer["status"] == "declined" and answer["reason"] == "expired"
    assert [e["status"] for e in client.participation.entries()] == ["declined", "declined"]


def test_garbage_weights_give_an_error_answer(client: HospitalClient) -> None:
    answer = client.fit(b"not msgpack", CFG)
    assert answer["status"] == "error" and "global weights unusable" in answer["reason"]


def test_a_malformed_round_config_is_an_error_answer_naming_the_field(
        client: HospitalClient) -> None:
    for bad, field in (({"image_size": "big"}, "image_size"), ({"local_epochs": 0},
                                                               "local_epochs")):
        answer = client.fit(b"unused", {**CFG, **bad})
        assert answer["status"] == "error", answer
        assert f"round configuration refused: {field}" in answer["reason"]
    assert list(client.participation.entries())[-1]["status"] == "error"


def test_fault_drills_are_test_code_and_cycle_by_round() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
    from drills import fault_for

    assert [fault_for("nan,shape", r) for r in (1, 2, 3)] == ["nan", "shape", "nan"]
    with pytest.raises(ValueError):
        fault_for("evil", 1)
    # Production settings have no fault switch at all (issue: one owner per boundary).
    assert not any("fault" in name for name in ClientSettings.model_fields)


def test_audit_cli(tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    state = str(tmp_path / "s")
    ParticipationLog(state).append(run="r", round=1, task="fit", status="ok", bytes=5,
                                   sha256="f" * 64)
    assert runner.invoke(app, ["client", "pause", "--state-dir", state]).exit_code == 0
    assert PauseSwitch(state).paused
    out = runner.invoke(app, ["client", "status", "--state-dir", state]).output
    assert json.loads(out)["paused"] is True and json.loads(out)["updates_sent"] == 1
    assert runner.invoke(app, ["client", "resume", "--state-dir", state]).exit_code == 0
    assert not PauseSwitch(state).paused
    out = runner.invoke(app, ["client", "log", "--state-dir", state, "--json"]).output
    assert json.loads(out.splitlines()[0])["sha256"] == "f" * 64


def test_calibrate_returns_batchnorm_statistics_of_the_given_weights(
        client: HospitalClient, global_blob: bytes) -> None:
    import numpy as np

    from leukofed.models import build_model
    from leukofed.train import recalibrate_batchnorm
    from leukofed.wire import batchnorm_stat_names, set_model_weights, weights_from_model

    answer = client.calibrate(global_blob, {**CFG, "calibration_images": 10})
    assert answer["status"] == "ok" and answer["num_examples"] == 10
    stats = decode_weights(answer["weights"])
    model = build_model("compact_cnn", 32, seed=0)
    assert set(stats) == batchnorm_stat_names(model)  # BatchNorm tensors and nothing else
    # The same numbers a central recalibration of these weights on these images gives.
    set_model_weights(model, decode_weights(global_blob))
    x, _ = client.arrays("train", 32)
    recalibrate_batchnorm(model, x, max_images=10)
    expected = weights_from_model(model)
    for name, value in stats.items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-4, atol=1e-6)
    initial = decode_weights(global_blob)
    assert any(not np.allclose(stats[n], initial[n]) for n in stats)  # they were measured
    wire = msgpack.packb(answer, use_bin_type=True)
    assert b"img-" not in wire and str(client.settings.data_dir).encode() not in wire
    entry = list(client.participation.entries())[-1]
    assert entry["task"] == "calibrate" and entry["sha256"] == answer["sha256"]
    client.pause_switch.pause("audit")
    assert client.calibrate(global_blob, CFG)["status"] == "declined"


def test_head_statistics_are_per_class_feature_sums_of_the_given_weights(
        tmp_path: Path, synthetic_dataset, global_blob: bytes) -> None:
    import numpy as np

    from leukofed.head_rebalance import class_feature_stats
    from leukofed.models import build_model
    from leukofed.train import head_features
    from leukofed.wire import set_model_weights

    # Enough images that every class has the five a hospital needs to describe it.
    client = HospitalClient(ClientSettings(
        hospital_id="a", data_dir=synthetic_dataset(per_class=12), block_size=2,
        state_dir=tmp_path / "state", cache_dir=tmp_path / "cache"))
    answer = client.calibrate(global_blob, {**CFG, "measure": "head",
                                            "calibration_images": 1000})
    assert answer["status"] == "ok"
    sums = decode_weights(answer["weights"])
    assert sorted(sums) == ["head/count", "head/outer", "head/total"]  # nothing else
    x, y = client.arrays("train", 32)
    assert answer["num_examples"] == len(x)
    # Four rows per image (the rotation ensemble), and the same sums a central pass of
    # these weights over these images gives.
    model = build_model("compact_cnn", 32, seed=0)
    set_model_weights(model, decode_weights(global_blob))
    expected = class_feature_stats(*head_features(model, x, y), 4, min_rows=4 * 5)
    np.testing.assert_array_equal(sums["head/count"], expected.count)
    np.testing.assert_allclose(sums["head/total"], expected.total, rtol=1e-4, atol=1e-4)
    assert sums["head/count"].sum() == 4 * len(x)
    wire = msgpack.packb(answer, use_bin_type=True)
    assert b"img-" not in wire and str(client.settings.data_dir).encode() not in wire
    assert list(client.participation.entries())[-1]["task"] == "head_statistics"


def test_credentials_dir_fills_every_unset_key_setting_and_turns_isolation_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "infra" / "security"))
    import compose_secrets

    for key in [k for k in __import__("os").environ if k.startswith("LEUKOFED_CLIENT_")]:
        monkeypatch.delenv(key)
    compose_secrets.generate(["a", "b"], tmp_path / "secrets", tmp_path / ".env")
    bundle = tmp_path / "secrets" / "hospital-a"
    # Only hospital a's secrets: not b's private keys, nor the aggregator's.
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()) \
        == ["keys/a.key", "keys/aggregator.pub", "keys/hospitals/a.pub", "keys/hospitals/b.pub",
            "tls/a.crt", "tls/a.key", "tls/ca.crt"]
    settings = ClientSettings(hospital_id="a", data_dir=tmp_path, credentials_dir=bundle,
                              broker_url="rediss://a:pw@broker:6379/0", _env_file=None)
    assert settings.isolate is True
    assert settings.signing_key_file == bundle / "keys/a.key"
    assert settings.tls_key_file == bundle / "tls/a.key"
    assert settings.aggregator_public_key_file == bundle / "keys/aggregator.pub"
    assert settings.peer_public_keys_dir == bundle / "keys/hospitals"
    assert [p for p in settings.startup_problems() if p] == []
    # An explicit setting wins; no credentials folder keeps the old defaults.
    own = tmp_path / "own.key"
    explicit = ClientSettings(hospital_id="a", data_dir=tmp_path, credentials_dir=bundle,
                              broker_url="rediss://a:pw@broker:6379/0",
                              signing_key_file=own, isolate=False, _env_file=None)
    assert explicit.signing_key_file == own and explicit.isolate is False
    plain = ClientSettings(hospital_id="a", data_dir=tmp_path, _env_file=None)
    assert plain.isolate is False and plain.signing_key_file is None
    with pytest.raises(ValueError, match="not a folder"):
        ClientSettings(hospital_id="a", data_dir=tmp_path, credentials_dir=tmp_path / "none",
                       _env_file=None)


def test_attack_second_secure_sum_on_the_same_weights_is_refused(
        tmp_path: Path, synthetic_dataset, global_blob: bytes, monkeypatch) -> None:
    """Issue 26, finding 3: an aggregator that changes threshold_fraction opens a new secure
    session in the same round, and the hospital trained again on the same weights with the
    same seed: the same update, so two sums over different groups of hospitals give it by
    difference. Now a hospital sends one masked vector per (run, round, purpose, global
    weights): the second request is refused before training, also by a restarted worker
    (the participation log). Real keys: tasks signed by the aggregator, keys and shares by
    each hospital; b and c run their secure side in-process."""
    from leukofed import signing, train
    from leukofed.secagg import VectorSpec
    from leukofed.transport import TASK_FIT, TASK_SECAGG_KEYS, TASK_SECAGG_SHARES
    from services.client.secure import SecureSessions

    keys_dir, peers_dir = tmp_path / "keys", tmp_path / "peers"
    for name in ("aggregator", "a", "b", "c"):
        signing.generate_keypair(keys_dir, name)
    for h in ("a", "b", "c"):
        (peers_dir / f"{h}.pub").parent.mkdir(exist_ok=True)
        (peers_dir / f"{h}.pub").write_bytes((keys_dir / f"{h}.pub").read_bytes())
    settings = ClientSettings(
        hospital_id="a", data_dir=synthetic_dataset(per_class=8), state_dir=tmp_path / "state",
        cache_dir=tmp_path / "cache", block_size=2,
        signing_key_file=keys_dir / "a.key", peer_public_keys_dir=peers_dir,
        aggregator_public_key_file=keys_dir / "aggregator.pub")
    victim = HospitalClient(settings)
    aggregator = signing.load_private_key(keys_dir / "aggregator.key")
    peer_keys = signing.load_public_keys(peers_dir)
    others = {h: SecureSessions(h, signing.load_private_key(keys_dir / f"{h}.key"), peer_keys)
              for h in ("b", "c")}
    fits: list[int] = []
    real_fit = train.local_fit
    monkeypatch.setattr(train, "local_fit", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    names = sorted(decode_weights(global_blob))
    spec = VectorSpec(tuple(names), (1.0,) * len(names))

    def task(client: HospitalClient, name: str, blob: bytes, secure: dict) -> dict:
        config = {**CFG, "secure": secure}
        auth = signing.sign_task(aggregator, name, "a", [blob, config])
        if name == TASK_FIT:
            return client.fit(blob, config, auth)
        return client.secure_stage(name, blob, config, auth)

    def secure_sum(fraction: float, client: HospitalClient) -> dict:
        """One secure sum of round 1 as far as a's masked vector."""
        params = {"purpose": "fit", "bits": 24, "neighbours": 2, "threshold_fraction": fraction}
        cfg = RoundConfig.decode({**CFG, "secure": params})
        answers = {"a": task(client, TASK_SECAGG_KEYS, b"", params),
                   **{h: s.keys(cfg, cap=10) for h, s in others.items()}}
        assert answers["a"]["status"] == "ok", answers["a"]
        adverts = {h: {k: v[k] for k in ("c_pk", "s_pk", "cap", "signature")}
                   for h, v in answers.items()}
        shares_params = {**params, "members": ["a", "b", "c"], "adverts": adverts}
        assert task(client, TASK_SECAGG_SHARES, b"", shares_params)["status"] == "ok"
        shares_cfg = RoundConfig.decode({**CFG, "secure": shares_params})
        received = {h: s.shares(shares_cfg)["ciphertexts"]["a"] for h, s in others.items()}
        cap = int(adverts["a"]["cap"])
        return task(client, TASK_FIT, global_blob, {
            **params, "received": received, "spec": spec.to_dict(), "cap": cap,
            "total_weight": float(cap + 20)})

    first = secure_sum(0.6, victim)
    assert first["status"] == "ok" and first["masked"], first.get("reason")
    # Issue 26, finding 7: the worker signs its masked vector with the report beside it
    # (metrics, class counts, fingerprint, profile sums, timings), after the last is set.
    public = {"a": signing.load_public_key(keys_dir / "a.pub")}
    body = signing.signed_fields(first)
    assert {"metrics", "class_counts", "dataset_fingerprint", "acquisition", "stain_sums",
            "timings", "bytes"} <= set(body)
    signing.verify_secagg(public, first["signature"], "a", "r1", 1, "masked", body)
    with pytest.raises(signing.SignatureRejected, match="signed digest"):
        signing.verify_secagg(public, first["signature"], "a", "r1", 1, "masked",
                              {**body, "metrics": {"loss": 0.0, "accuracy": 1.0}})
    again = secure_sum(0.7, victim)  # a new session: another threshold, same weights
    assert again["status"] == "error" and "replay" in again["reason"], again
    assert "masked" not in again and len(fits) == 1  # refused before training
    restarted = HospitalClient(settings)  # same state folder: the log remembers the key
    assert "replay" in secure_sum(0.8, restarted)["reason"]
    assert len(fits) == 1
    sent = [e for e in ParticipationLog(settings.state_path).entries()
            if e["task"] == "fit" and e["status"] == "ok"]
    assert len(sent) == 1 and sent[0]["global_sha256"] == hashlib.sha256(global_blob).hexdigest()
