"""`leukofed promote` holds a version to the release gate (leukofed.gate): each floor with
the version's value, `promote best` picks the best version that passes, and an override
needs --force --reason and is recorded with the alias move (real MLflow registry in SQLite;
through a real MLflow server: tests/integration/test_release_gate.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gate_support import GOOD_AUDIT, WEAK_CONFUSION, gate_card, sqlite_registry, with_metric
from typer.testing import CliRunner

from leukofed.cli import app
from registry.client import HISTORY_MAX_CHARS, HISTORY_TAG, OVERRIDE_TAG, Registry

NAME = "leukofed-gate-test"
RANK = {"audit_worst_macro_f1": "0.97"}
LABELS = ["macro-F1 (test)", "malignant sensitivity", "malignant specificity",
          "recall Benign", "recall Early Pre-B", "recall Pre-B", "recall Pro-B",
          "conformal coverage (target 0.950)", "refer share",
          "shortcut audit: answers following the colour"]


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "engineer")
    with sqlite_registry(tmp_path, monkeypatch, NAME) as (client, add):
        yield client, add


def champion(client) -> str | None:  # noqa: ANN001
    try:
        return str(client.get_model_version_by_alias(NAME, "champion").version)
    except Exception:
        return None


def promote(*args: str):  # noqa: ANN202
    return CliRunner().invoke(app, ["promote", *args, "--model-name", NAME])


def weak_card() -> dict:
    """Below every floor: the issue's demo champion, with a colour-following audit."""
    return gate_card(WEAK_CONFUSION, achieved=0.924, refer_share=0.25,
                     audit={**GOOD_AUDIT, "audit_follow_colour": "0.2"})


def test_a_version_below_the_floors_is_refused_with_each_floor_and_value(registry) -> None:
    client, add = registry
    version = add({**GOOD_AUDIT, "audit_follow_colour": "0.2"}, card=weak_card())
    result = promote(version)
    assert result.exit_code == 2, result.output
    out = result.output
    for label in LABELS:  # every floor, passed or not, with its bound and the value
        assert label in out, label
    for value, state in (("0.870", "FAIL"), ("0.719", "FAIL"), ("0.990", "pass"),
                         ("0.924", "FAIL"), ("0.250", "FAIL"), ("0.200", "FAIL")):
        assert any(value in line and state in line for line in out.splitlines()), value
    assert ">= 0.930" in out and ">= 0.980" in out and "<= 0.100" in out
    assert ("refused: version 1 fails the release gate (macro_f1, malignant_specificity, "
            "recall_Benign, recall_Early, coverage, refer_share, follow_colour)") in out
    assert "--force --reason" in out
    assert champion(client) is None
    assert Registry(client.tracking_uri, NAME).alias_history() == []


def test_a_version_that_passes_is_promoted_and_the_pass_recorded(registry) -> None:
    client, add = registry
    version = add(GOOD_AUDIT)
    result = promote(version)
    assert result.exit_code == 0, result.output
    assert "verdict: passes" in result.output and f"version {version} is now @champion" \
        in result.output
    last = Registry(client.tracking_uri, NAME).alias_history()[-1]
    assert last["gate"] == "passed" and last["by"] == "engineer" and "reason" not in last
    assert OVERRIDE_TAG not in client.get_model_version(NAME, version).tags


def test_force_without_a_reason_is_refused(registry) -> None:
    client, add = registry
    version = add(GOOD_AUDIT, card=weak_card())
    for extra in (["--force"], ["--force", "--reason", "  "]):
        result = promote(version, *extra)
        assert result.exit_code == 2, result.output
        assert "--force needs --reason" in result.output
    assert champion(client) is None


def test_force_with_a_reason_promotes_and_records_the_override(registry) -> None:
    client, add = registry
    version = add(GOOD_AUDIT, card=with_metric(gate_card(), "recall_Pro", 0.85))
    result = promote(version, "--force", "--reason", "pilot site; Pro-B reviewed by hand")
    assert result.exit_code == 0, result.output
    assert "promoted because of --force" in result.output
    assert "override recorded" in result.output
    assert champion(client) == version
    last = Registry(client.tracking_uri, NAME).alias_history()[-1]
    assert last["gate"] == "overridden" and last["version"] == version
    assert last["reason"] == "pilot site; Pro-B reviewed by hand"
    assert last["failed"] == ["recall_Pro 0.850 (floor >= 0.900)"]
    assert last["by"] == "engineer" and last["at"].endswith("+00:00")
    on_version = json.loads(client.get_model_version(NAME, version).tags[OVERRIDE_TAG])
    assert on_version == last


def test_promote_best_takes_the_best_version_that_passes(registry) -> None:
    client, add = registry
    below = add({**GOOD_AUDIT, "audit_worst_macro_f1": "0.99"},
                card=with_metric(gate_card(), "malignant_sensitivity", 0.97))
    passing = add({**GOOD_AUDIT, "audit_worst_macro_f1": "0.95"})
    add({**GOOD_AUDIT, "audit_worst_macro_f1": "0.90"})  # passes too, ranked lower
    result = promote("best")
    assert result.exit_code == 0, result.output
    assert (f"version {below} (audit_worst_macro_f1 0.9900): fails malignant_sensitivity "
            "0.970 (floor >= 0.980)") in result.output
    assert f"passes the release gate: version {passing}" in result.output
    assert champion(client) == passing


def test_promote_best_says_plainly_when_no_version_passes(registry) -> None:
    client, add = registry
    add({**GOOD_AUDIT, "audit_worst_macro_f1": "0.93"}, card=weak_card())
    add({**GOOD_AUDIT, "audit_worst_macro_f1": "0.91"}, card=None)
    result = promote("best")
    assert result.exit_code == 2, result.output
    assert f"no version of {NAME} passes the release gate (2 checked)" in result.output
    assert "refused: nothing promoted" in result.output
    assert champion(client) is None
    forced = promote("best", "--force", "--reason", "demo: show the stack end to end")
    assert forced.exit_code == 0, forced.output
    assert champion(client) == "1"  # the best by the ranking metric
    assert Registry(client.tracking_uri, NAME).alias_history()[-1]["gate"] == "overridden"


def test_floors_from_options_and_environment(registry,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    client, add = registry
    version = add(GOOD_AUDIT, card=with_metric(gate_card(refer_share=0.2), "macro_f1", 0.91))
    assert promote(version).exit_code == 2
    assert promote(version, "--min-macro-f1", "0.9").exit_code == 2  # refer share still fails
    monkeypatch.setenv("LEUKOFED_GATE_MAX_REFER_SHARE", "0.25")
    assert promote(version).exit_code == 2  # macro-F1 still fails
    result = promote(version, "--min-macro-f1", "0.9")
    assert result.exit_code == 0, result.output
    assert champion(client) == version
    bad = promote(version, "--min-macro-f1", "2")
    assert bad.exit_code == 2 and "release gate floors" in bad.output


def test_the_alias_history_fits_the_registry_column(registry) -> None:
    client, add = registry
    version = add(GOOD_AUDIT)
    reg = Registry(client.tracking_uri, NAME)
    for i in range(40):
        reg.promote(version, gate={"gate": "overridden", "reason": f"{i} " + "x" * 900,
                                   "failed": ["macro_f1 0.500 (floor >= 0.930)"]})
    stored = client.get_registered_model(NAME).tags[HISTORY_TAG]
    assert len(stored) <= HISTORY_MAX_CHARS
    history = reg.alias_history()
    assert history[-1]["reason"].startswith("39 ") and len(history[-1]["reason"]) == 500
