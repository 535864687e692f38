"""`leukofed promote` shows the shortcut audit and refuses a colour reader (real MLflow
registry in a local SQLite store; no server needed for the registry calls). The audit is one
floor of the release gate (leukofed.gate; its other floors: tests/unit/test_promote_gate.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from gate_support import sqlite_registry
from typer.testing import CliRunner

from leukofed.cli import app

NAME = "leukofed-promote-test"
COLOUR_READER = {"audit_original_macro_f1": "0.98", "audit_recoloured_macro_f1": "0.51",
                 "audit_worst_macro_f1": "0.51", "audit_follow_colour": "0.36",
                 "val_macro_f1": "0.99"}
CELL_READER = {"audit_original_macro_f1": "0.93", "audit_recoloured_macro_f1": "0.92",
               "audit_worst_macro_f1": "0.92", "audit_follow_colour": "0.02",
               "val_macro_f1": "0.93"}


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Each version carries a model card that passes the release gate's other floors
    # (tests/gate_support.py), so what these tests change is the audit.
    with sqlite_registry(tmp_path, monkeypatch, NAME) as (client, add):
        yield client, add


def champion(client) -> str | None:
    try:
        return str(client.get_model_version_by_alias(NAME, "champion").version)
    except Exception:
        return None


def test_promote_best_refuses_the_colour_reader(registry, tmp_path: Path) -> None:
    import mlflow

    client, add = registry
    add(COLOUR_READER)
    # What another part of the process (the inference service's exporter) may have left
    # behind: the CLI must use MLFLOW_TRACKING_URI for the registry too.
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    result = CliRunner().invoke(app, ["promote", "best", "--model-name", NAME])
    assert result.exit_code == 2, result.output
    assert "refused" in result.output and "follow the new colour" in result.output
    assert "no version of" in result.output and "passes the release gate" in result.output
    assert "recoloured" in result.output  # the audit table was shown first
    assert champion(client) is None
    forced = CliRunner().invoke(app, ["promote", "best", "--model-name", NAME, "--force",
                                      "--reason", "test: a colour reader, knowingly"])
    assert forced.exit_code == 0, forced.output
    assert champion(client) == "1"


def test_promote_best_ranks_by_the_worse_of_original_and_recoloured(registry) -> None:
    client, add = registry
    add(COLOUR_READER)  # best validation F1, worst under recolouring
    cell = add(CELL_READER)
    result = CliRunner().invoke(app, ["promote", "best", "--model-name", NAME])
    assert result.exit_code == 0, result.output
    assert champion(client) == cell


def test_promote_refuses_a_version_without_an_audit(registry) -> None:
    client, add = registry
    version = add({"val_macro_f1": "0.9"})
    result = CliRunner().invoke(app, ["promote", version, "--model-name", NAME])
    assert result.exit_code == 2 and "no shortcut audit" in result.output
    assert "fails the release gate (follow_colour)" in result.output
    assert champion(client) is None
    missing = CliRunner().invoke(app, ["promote", "best", "--model-name", NAME])
    assert missing.exit_code == 1 and "--metric val_macro_f1" in missing.output


def test_promote_prints_the_model_card_summary_first(registry, tmp_path: Path) -> None:
    import json

    from leukofed.card import build_card, card_summary

    client, add = registry
    exp = client.create_experiment("cards")
    run = client.create_run(exp).info.run_id
    card = build_card({"model_name": NAME, "version": "1",
                       "test": {"source": "held-out", "confusion": [[40, 2, 0, 0], [1, 30, 3, 0],
                                                                    [0, 2, 35, 1], [0, 0, 1, 38]]},
                       "audit": {k: float(v) for k, v in CELL_READER.items()
                                 if k.startswith("audit_")}})
    (tmp_path / "card.json").write_text(json.dumps(card))
    client.log_artifact(run, str(tmp_path / "card.json"), "cards/version-1")
    version = add({**CELL_READER, "model_card": f"{run}:cards/version-1/card.json"},
                  card=None)
    # This card's Early recall (0.88) is below the gate's 0.90, and it has no conformal
    # coverage: refused after the summary, or promoted with a recorded reason.
    result = CliRunner().invoke(app, ["promote", version, "--model-name", NAME])
    assert result.exit_code == 2, result.output
    summary = card_summary(card)
    assert summary.splitlines()[1] in result.output  # the accuracy line with its interval
    assert result.output.index(summary.splitlines()[0]) < result.output.index("refused")
    result = CliRunner().invoke(app, ["promote", version, "--model-name", NAME, "--force",
                                      "--reason", "test"])
    assert result.exit_code == 0, result.output
    assert result.output.index(summary.splitlines()[0]) < result.output.index("is now @")
    # A version registered before cards existed says so, and the gate finds it missing.
    old = add(CELL_READER, card=None)
    result = CliRunner().invoke(app, ["promote", old, "--model-name", NAME])
    assert result.exit_code == 2 and "has no model card" in result.output
    assert "macro-F1 (test)" in result.output and "FAIL (missing)" in result.output
