"""A hospital under example-level differential privacy (issue 27, items 2 and 3): DP-SGD in
its fit, its spent epsilon in its answer, participation log and ledger, and its own limit
(LEUKOFED_CLIENT_MAX_EPSILON) refusing what would exceed it. Tiny group-norm models."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from leukofed import dp_sgd
from leukofed.wire import encode_weights
from services.client.hospital import HospitalClient, TrainerCache
from services.client.settings import ClientSettings

MODEL = {"model": "compact_cnn", "image_size": 16, "norm": "group", "cell_focus": False,
         "rotation_ensemble": False}
DP = {"run_id": "r1", "round": 1, "batch_size": 4, "jit_compile": False,
      "send_profile": False, "dp_level": "example", "dp_clip_norm": 1.0,
      "dp_noise_multiplier": 1.5, "dp_delta": 1e-5, **MODEL}


# One model and one traced DP step for the module, as virtual hospitals share them.
TRAINERS = TrainerCache()


def _client(tmp_path: Path, synthetic_dataset: Any, **settings: Any) -> HospitalClient:
    data = synthetic_dataset(per_class=4)
    return HospitalClient(ClientSettings(
        hospital_id="a", data_dir=data, state_dir=tmp_path / "state",
        cache_dir=tmp_path / "cache", block_size=2, **settings), TRAINERS)


@pytest.fixture(scope="module")
def group_blob() -> bytes:
    from leukofed.models import build_model
    from leukofed.wire import weights_from_model

    return encode_weights(weights_from_model(build_model(
        "compact_cnn", 16, norm="group", cell_focus=False, rotation_ensemble=False, seed=0)))


def _one_round(client: HospitalClient, cfg: dict[str, Any]) -> tuple[float, float, int]:
    n = len(client.dataset()[1]["train"])
    q, steps = dp_sgd.sampling_plan(n, cfg["batch_size"], 1)
    return cfg["dp_noise_multiplier"], q, steps


def test_example_level_fit_reports_what_it_spent_everywhere(
        tmp_path: Path, synthetic_dataset: Any, group_blob: bytes) -> None:
    client = _client(tmp_path, synthetic_dataset)
    answer = client.fit(group_blob, DP)
    assert answer["status"] == "ok", answer
    expected = dp_sgd.epsilon_of([_one_round(client, DP)], 1e-5)
    m = answer["metrics"]
    assert m["dp_epsilon"] == pytest.approx(expected)
    assert m["dp_epsilon_next"] == pytest.approx(
        dp_sgd.epsilon_of([_one_round(client, DP)] * 2, 1e-5))
    assert m["dp_noise_multiplier"] == 1.5
    assert "loss" not in m and "accuracy" not in m  # exact training aggregates stay home
    assert "acquisition" not in answer  # exact statistics of the images stay home
    entries = client.ledger.entries()
    assert [(e.run, e.round, e.noise_multiplier) for e in entries] == [("r1", 1, 1.5)]
    logged = [e for e in client.participation.entries() if e["task"] == "fit"][-1]
    assert logged["status"] == "ok"
    assert logged["dp_epsilon"] == pytest.approx(expected)
    assert logged["dp_epsilon_total"] == pytest.approx(expected)  # its first run


def test_hospital_refuses_the_round_that_would_exceed_its_own_limit(
        tmp_path: Path, synthetic_dataset: Any, group_blob: bytes,
        caplog: pytest.LogCaptureFixture) -> None:
    probe = _client(tmp_path / "probe", synthetic_dataset)
    event = _one_round(probe, DP)
    one, two = (dp_sgd.epsilon_of([event] * k, 1e-5) for k in (1, 2))
    limit = (one + two) / 2  # one round fits, a second does not
    client = _client(tmp_path, synthetic_dataset, max_epsilon=limit)
    assert client.fit(group_blob, DP)["status"] == "ok"
    with caplog.at_level(logging.WARNING, logger="services.client.hospital"):
        refused = client.fit(group_blob, {**DP, "round": 2})
    assert refused["status"] == "declined" and refused["reason"] == "privacy_budget"
    assert "LEUKOFED_CLIENT_MAX_EPSILON" in refused["message"]
    assert f"{two:.3f}" in refused["message"]  # what the round would have made it
    assert any("refused fit round 2" in r.getMessage() for r in caplog.records)
    last = list(client.participation.entries())[-1]
    assert (last["status"], last["reason"], last["round"]) == ("refused", "privacy_budget", 2)
    assert len(client.ledger.entries()) == 1  # nothing trained, nothing spent
    # Another run on the same images counts too: the limit is over every run.
    again = client.fit(group_blob, {**DP, "run_id": "r2"})
    assert again["status"] == "declined" and again["reason"] == "privacy_budget"


def test_run_target_is_enforced_by_the_hospital(
        tmp_path: Path, synthetic_dataset: Any, group_blob: bytes) -> None:
    client = _client(tmp_path, synthetic_dataset)
    one = dp_sgd.epsilon_of([_one_round(client, DP)], 1e-5)
    refused = client.fit(group_blob, {**DP, "dp_target_epsilon": one / 2})
    assert refused["reason"] == "privacy_budget"
    assert "run's target" in refused["message"]


def test_with_a_limit_set_plain_training_and_statistics_are_refused(
        tmp_path: Path, synthetic_dataset: Any, group_blob: bytes) -> None:
    client = _client(tmp_path, synthetic_dataset, max_epsilon=8.0)
    plain = {k: v for k, v in DP.items() if not k.startswith("dp_")}
    answer = client.fit(group_blob, plain)
    assert answer["status"] == "declined" and answer["reason"] == "privacy_budget"
    assert "only example-level" in answer["message"]
    calibrate = client.calibrate(group_blob, {**plain, "measure": "head"})
    assert calibrate["status"] == "declined" and calibrate["reason"] == "privacy_budget"
    # Evaluation of the val and test images goes on, without the membership audit's
    # histogram of training-image losses (an exact count of them, outside any epsilon).
    evaluation = client.evaluate(group_blob, {**plain, "membership_images": 5})
    assert evaluation["status"] == "ok" and "membership" not in evaluation


def test_batchnorm_model_is_refused_at_the_example_level(
        tmp_path: Path, synthetic_dataset: Any) -> None:
    from leukofed.models import build_model
    from leukofed.wire import weights_from_model

    client = _client(tmp_path, synthetic_dataset)
    blob = encode_weights(weights_from_model(build_model(
        "compact_cnn", 16, cell_focus=False, rotation_ensemble=False, seed=0)))
    answer = client.fit(blob, {**DP, "norm": "batch"})
    assert answer["status"] == "error" and "BatchNorm" in answer["reason"]


def test_calibrated_noise_reaches_the_target_in_the_runs_rounds(
        tmp_path: Path, synthetic_dataset: Any, group_blob: bytes) -> None:
    client = _client(tmp_path, synthetic_dataset)
    cfg = {**DP, "dp_noise_multiplier": 0.0, "dp_target_epsilon": 6.0, "dp_rounds": 3}
    answer = client.fit(group_blob, cfg)
    assert answer["status"] == "ok", answer
    sigma = answer["metrics"]["dp_noise_multiplier"]
    _, q, steps = _one_round(client, DP)
    assert dp_sgd.epsilon_of([(sigma, q, steps)] * 3, 1e-5) <= 6.0
    assert answer["metrics"]["dp_epsilon"] < 6.0


def test_hospital_it_sees_what_its_images_spent(tmp_path: Path) -> None:
    import json

    import typer
    from typer.testing import CliRunner

    from services.client.cli import register

    ledger = dp_sgd.HospitalLedger(tmp_path)
    ledger.record(dp_sgd.LedgerEntry("r1", 1, 1.2, 0.1, 20, 1.0))
    ledger.record(dp_sgd.LedgerEntry("r2", 1, 1.2, 0.1, 20, 1.0))
    app = typer.Typer()
    register(app)
    out = CliRunner().invoke(app, ["client", "privacy", "--state-dir", str(tmp_path)])
    shown = json.loads(out.output)
    assert shown["runs"]["r1"]["rounds"] == 1
    assert shown["total_epsilon"] == pytest.approx(ledger.epsilon(1e-5))
    assert shown["runs"]["r1"]["epsilon"] < shown["total_epsilon"]
