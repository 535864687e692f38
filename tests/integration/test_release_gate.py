"""The release gate through the `leukofed` command against a real MLflow server: a version
below the floors is refused with each floor and its value, `--force` alone is refused, and
`--force --reason` moves @champion with the override recorded in the alias history and on
the version (the cards are logged as the aggregator logs them; no model is trained)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import VENV_BIN
from gate_support import GOOD_AUDIT, WEAK_CONFUSION, gate_card, log_card

from registry.client import OVERRIDE_TAG, Registry

pytestmark = pytest.mark.integration

NAME = "leukofed-gate-it"
ROOT = Path(__file__).resolve().parents[2]


def _promote(url: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEUKOFED_GATE_",
                                                                      "MLFLOW_"))}
    env.pop("LEUKOFED_MAX_FOLLOW_COLOUR", None)
    env.update(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME="engineer",
               LEUKOFED_AGGREGATOR_MODEL_NAME=NAME)
    return subprocess.run([str(VENV_BIN / "leukofed"), "promote", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _register(client, tags: dict[str, str], card: dict) -> str:  # noqa: ANN001
    where = log_card(client, card, "cards")  # "RUN:cards/card.json", as the aggregator tags
    run = where.split(":")[0]
    mv = client.create_model_version(NAME, f"runs:/{run}/model", run_id=run,
                                     tags={**tags, "run_id": "it", "model_card": where})
    return str(mv.version)


def test_the_gate_refuses_through_the_cli_and_a_reasoned_override_is_recorded(
        mlflow_server) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.url, mlflow_server.url)
    client.create_registered_model(NAME)
    good = _register(client, {**GOOD_AUDIT, "audit_worst_macro_f1": "0.95"}, gate_card())
    weak = _register(client, {**GOOD_AUDIT, "audit_worst_macro_f1": "0.97"},
                     gate_card(WEAK_CONFUSION, achieved=0.924, refer_share=0.25))

    # The weak version, named: refused, every floor printed with the version's value.
    done = _promote(mlflow_server.url, weak)
    assert done.returncode == 2, done.stdout + done.stderr
    for row in ("macro-F1 (test)", "malignant specificity", "recall Benign",
                "conformal coverage (target 0.950)", "refer share"):
        line = next(x for x in done.stdout.splitlines() if x.strip().startswith(row))
        assert "FAIL" in line, line
    assert "0.719" in done.stdout and "0.924" in done.stdout and "0.250" in done.stdout
    assert f"refused: version {weak} fails the release gate" in done.stderr
    assert "Traceback" not in done.stderr

    # --force alone: refused before anything moves.
    done = _promote(mlflow_server.url, weak, "--force")
    assert done.returncode == 2 and "--force needs --reason" in done.stderr

    # `best` ranks the weak version first, and takes the good one instead.
    done = _promote(mlflow_server.url, "best")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"version {good} is now @champion" in done.stdout
    registry = Registry(mlflow_server.url, NAME)
    assert registry.alias("champion").version == good

    # The override, with a reason: moved, and recorded with who, when, why, what failed.
    done = _promote(mlflow_server.url, weak, "--force", "--reason",
                    "integration test: override drill")
    assert done.returncode == 0, done.stdout + done.stderr
    assert registry.alias("champion").version == weak
    history = registry.alias_history()
    assert [h["gate"] for h in history] == ["passed", "overridden"]
    last = history[-1]
    assert last["version"] == weak and last["from"] == good and last["by"] == "engineer"
    assert last["reason"] == "integration test: override drill" and last["at"]
    assert [f.split()[0] for f in last["failed"]] == [
        "macro_f1", "malignant_specificity", "recall_Benign", "recall_Early", "coverage",
        "refer_share"]
    assert json.loads(client.get_model_version(NAME, weak).tags[OVERRIDE_TAG]) == last
