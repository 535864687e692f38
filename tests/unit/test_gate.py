"""The release gate (leukofed.gate): every floor refuses on its own and is named, a good
version passes, a missing metric is refused as missing, the floors are configurable."""

from __future__ import annotations

import pytest
from gate_support import GOOD_AUDIT, WEAK_CONFUSION, gate_card, with_metric

from leukofed.gate import GateFloors, check_gate, format_gate

ALL_FLOORS = ["macro_f1", "malignant_sensitivity", "malignant_specificity", "recall_Benign",
              "recall_Early", "recall_Pre", "recall_Pro", "coverage", "refer_share",
              "follow_colour"]


@pytest.fixture
def floors(monkeypatch: pytest.MonkeyPatch) -> GateFloors:
    for name in ("MIN_MACRO_F1", "MIN_SENSITIVITY", "MIN_SPECIFICITY", "MIN_CLASS_RECALL",
                 "MAX_COVERAGE_SHORTFALL", "MAX_REFER_SHARE", "MAX_FOLLOW_COLOUR",
                 "MAX_MEMBERSHIP_AUC"):
        monkeypatch.delenv(f"LEUKOFED_GATE_{name}", raising=False)
    monkeypatch.delenv("LEUKOFED_MAX_FOLLOW_COLOUR", raising=False)
    return GateFloors()


def test_the_defaults_are_the_issues_floors(floors: GateFloors) -> None:
    assert (floors.min_macro_f1, floors.min_sensitivity, floors.min_specificity,
            floors.min_class_recall, floors.max_coverage_shortfall, floors.max_refer_share,
            floors.max_follow_colour) == (0.93, 0.98, 0.93, 0.90, 0.02, 0.10, 0.10)


def test_a_good_version_passes_every_floor(floors: GateFloors) -> None:
    verdict = check_gate(gate_card(), GOOD_AUDIT, floors)
    assert verdict.passed, format_gate(verdict)
    assert [c.name for c in verdict.checks] == ALL_FLOORS
    assert verdict.failed == ()
    table = format_gate(verdict)
    assert "FAIL" not in table and "verdict: passes" in table
    assert "macro-F1 (test)" in table and ">= 0.930" in table and "0.982" in table


BELOW = [  # (what is changed, the one floor it must fail)
    (lambda c: with_metric(c, "macro_f1", 0.925), "macro_f1"),
    (lambda c: with_metric(c, "malignant_sensitivity", 0.975), "malignant_sensitivity"),
    (lambda c: with_metric(c, "malignant_specificity", 0.92), "malignant_specificity"),
    (lambda c: with_metric(c, "recall_Benign", 0.89), "recall_Benign"),
    (lambda c: with_metric(c, "recall_Early", 0.5), "recall_Early"),
    (lambda c: with_metric(c, "recall_Pre", 0.899), "recall_Pre"),
    (lambda c: with_metric(c, "recall_Pro", 0.0), "recall_Pro"),
    (lambda c: gate_card(achieved=0.924), "coverage"),
    (lambda c: gate_card(refer_share=0.11), "refer_share"),
    (lambda c: gate_card(audit={**GOOD_AUDIT, "audit_follow_colour": "0.11"}), "follow_colour"),
]


@pytest.mark.parametrize(("change", "name"), BELOW, ids=[name for _, name in BELOW])
def test_each_floor_refuses_on_its_own_and_is_named(change, name: str,  # noqa: ANN001
                                                    floors: GateFloors) -> None:
    card = change(gate_card())
    tags = {"audit_follow_colour": card["audit"]["metrics"]["audit_follow_colour"]}
    verdict = check_gate(card, tags, floors)
    assert not verdict.passed
    assert verdict.failed_names() == [name]
    failed = verdict.failed[0]
    assert failed.value is not None and not failed.missing
    table = format_gate(verdict)
    row = next(line for line in table.splitlines() if failed.label in line)
    assert row.rstrip().endswith("FAIL") or "FAIL:" in row
    assert f"{failed.value:.3f}" in row and failed.bound in row
    assert name in verdict.summary() and f"{failed.value:.3f}" in verdict.summary()


def test_the_floor_itself_passes(floors: GateFloors) -> None:
    card = with_metric(gate_card(achieved=0.93, refer_share=0.10), "macro_f1", 0.93)
    card = with_metric(card, "recall_Benign", 0.90)
    verdict = check_gate(card, {"audit_follow_colour": "0.10"}, floors)
    assert verdict.passed, format_gate(verdict)


def test_the_issues_demo_champion_fails_where_the_issue_says(floors: GateFloors) -> None:
    card = gate_card(WEAK_CONFUSION, achieved=0.924, refer_share=0.25)
    verdict = check_gate(card, GOOD_AUDIT, floors)
    assert verdict.failed_names() == ["macro_f1", "malignant_specificity", "recall_Benign",
                                      "recall_Early", "coverage", "refer_share"]


def test_a_missing_metric_is_refused_as_missing(floors: GateFloors) -> None:
    # No card at all (a version registered before cards): every card metric is missing.
    verdict = check_gate(None, GOOD_AUDIT, floors)
    assert verdict.failed_names() == ALL_FLOORS[:-1]
    assert all(c.missing for c in verdict.failed)
    assert "missing" in format_gate(verdict) and "FAIL (missing)" in format_gate(verdict)
    # No audit either: the colour row says so.
    verdict = check_gate(None, {}, floors)
    assert "no shortcut audit" in format_gate(verdict)
    # One metric the card does not carry (None, as JSON keeps NaN), and no calibration.
    card = with_metric(gate_card(), "recall_Pre", None)
    card["conformal"] = {"measured": False}
    verdict = check_gate(card, GOOD_AUDIT, floors)
    assert verdict.failed_names() == ["recall_Pre", "coverage", "refer_share"]
    assert all(c.missing for c in verdict.failed)
    # The audit is read from the card when the version's tags lack it.
    assert check_gate(gate_card(), {}, floors).passed


def test_floors_come_from_the_environment_and_arguments_win(
        monkeypatch: pytest.MonkeyPatch, floors: GateFloors) -> None:
    weak = gate_card(WEAK_CONFUSION, achieved=0.924, refer_share=0.25)
    monkeypatch.setenv("LEUKOFED_GATE_MIN_MACRO_F1", "0.8")
    monkeypatch.setenv("LEUKOFED_GATE_MIN_SPECIFICITY", "0.7")
    monkeypatch.setenv("LEUKOFED_GATE_MIN_CLASS_RECALL", "0.7")
    monkeypatch.setenv("LEUKOFED_GATE_MAX_COVERAGE_SHORTFALL", "0.03")
    monkeypatch.setenv("LEUKOFED_GATE_MAX_REFER_SHARE", "0.3")
    monkeypatch.setenv("LEUKOFED_MAX_FOLLOW_COLOUR", "0.25")  # the audit's older name
    relaxed = GateFloors()
    assert relaxed.max_follow_colour == 0.25
    assert check_gate(weak, {"audit_follow_colour": "0.2"}, relaxed).passed
    strict = GateFloors(min_macro_f1=0.9, max_follow_colour=0.1)
    assert check_gate(weak, {"audit_follow_colour": "0.2"}, strict).failed_names() == [
        "macro_f1", "follow_colour"]
    with pytest.raises(ValueError):
        GateFloors(min_macro_f1=1.5)


def test_the_membership_floor_is_off_by_default_and_judges_the_cards_audit(
        floors: GateFloors) -> None:
    """leukofed.membership: off unless set; then the card's audit AUC (else the version's
    membership_auc tag) must be at most the ceiling, and a version without it is missing."""
    from leukofed.membership import SUGGESTED_MAX_AUC

    assert floors.max_membership_auc is None
    card = gate_card()
    assert check_gate(card, GOOD_AUDIT, floors).passed  # no audit, no floor: passes
    strict = floors.model_copy(update={"max_membership_auc": SUGGESTED_MAX_AUC})
    verdict = check_gate(card, GOOD_AUDIT, strict)
    assert verdict.failed_names() == ["membership_auc"] and verdict.failed[0].missing
    leaky = {**card, "membership": {"measured": True, "auc": 0.71}}
    verdict = check_gate(leaky, GOOD_AUDIT, strict)
    assert verdict.failed_names() == ["membership_auc"]
    assert "right 71% of the time" in format_gate(verdict)
    assert check_gate({**card, "membership": {"measured": True, "auc": 0.52}}, GOOD_AUDIT,
                      strict).passed
    assert check_gate(card, {**GOOD_AUDIT, "membership_auc": "0.55"}, strict).passed
    with pytest.raises(ValueError):
        GateFloors(max_membership_auc=0.4)
