"""The release gate: the clinical floors a model version must reach before an alias (the
champion) points at it.

A version is judged on what it already carries, nothing is measured again: its model card
(``leukofed.card``: test metrics on the aggregator's held-out split, conformal coverage and
refer share) and its shortcut-audit tags (``audit_*``, ``leukofed.audit``); with
``max_membership_auc`` set (off by default) also its membership-inference audit
(``leukofed.membership``). Each floor is one row with the version's value; a metric the
version does not carry fails its row as *missing*, so a version registered without a card, a
test split or calibration cannot pass.

The floors are ``GateFloors`` (``LEUKOFED_GATE_*`` environment variables, or the options of
``leukofed promote``); ``check_gate`` is pure: dicts in, a ``GateVerdict`` out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from leukofed.audit import DEFAULT_MAX_FOLLOW_COLOUR, audit_verdict
from leukofed.card import finite_number
from leukofed.labels import CLASSES
from leukofed.membership import SUGGESTED_MAX_AUC

# How the classes read in the gate's table (leukofed.card shows them the same way).
_CLASS_NAMES = {"Benign": "Benign", "Early": "Early Pre-B", "Pre": "Pre-B", "Pro": "Pro-B"}


class GateFloors(BaseSettings):
    """The floors ``leukofed promote`` holds a version to (defaults: issue 25)."""

    model_config = SettingsConfigDict(env_prefix="LEUKOFED_GATE_", extra="ignore",
                                      populate_by_name=True)

    min_macro_f1: float = Field(0.93, ge=0, le=1, description="release gate: lowest test "
                                "macro-F1 (model card) a version may be promoted with")
    min_sensitivity: float = Field(0.98, ge=0, le=1, description="release gate: lowest "
                                   "malignant sensitivity (any class but Benign called "
                                   "malignant)")
    min_specificity: float = Field(0.93, ge=0, le=1, description="release gate: lowest "
                                   "malignant specificity (Benign called Benign)")
    min_class_recall: float = Field(0.90, ge=0, le=1, description="release gate: lowest "
                                    "recall of every class")
    max_coverage_shortfall: float = Field(
        0.02, ge=0, le=1, description="release gate: how far the conformal coverage achieved "
        "on test may fall under its target (0.02: two points)")
    max_refer_share: float = Field(0.10, ge=0, le=1, description="release gate: highest share "
                                   "of test images referred as uncertain")
    max_follow_colour: float = Field(
        DEFAULT_MAX_FOLLOW_COLOUR, ge=0, le=1,
        validation_alias=AliasChoices("LEUKOFED_GATE_MAX_FOLLOW_COLOUR",
                                      "LEUKOFED_MAX_FOLLOW_COLOUR"),
        description="release gate (shortcut audit): highest share of recoloured test images "
                    "whose answer follows the new colour")
    max_membership_auc: float | None = Field(
        None, ge=0.5, le=1, description="release gate (privacy): highest AUC of the model "
        "card's membership-inference audit (leukofed.membership; 0.5: an attacker does no "
        f"better than a coin). Off (unset) by default; suggested {SUGGESTED_MAX_AUC:g} "
        "(docs/privacy.md). When set, a version without the audit fails as missing")


@dataclass(frozen=True)
class GateCheck:
    """One floor: ``name`` (a stable key), ``label`` for people, the bound as text
    (``">= 0.930"``), the version's value (None: missing) and whether it holds."""

    name: str
    label: str
    bound: str
    value: float | None
    passed: bool
    note: str = ""

    @property
    def missing(self) -> bool:
        return self.value is None

    def describe(self) -> str:
        """``macro_f1 0.874 (floor >= 0.930)`` or ``recall_Benign missing (floor ...)``."""
        shown = "missing" if self.value is None else f"{self.value:.3f}"
        return f"{self.name} {shown} (floor {self.bound})"


@dataclass(frozen=True)
class GateVerdict:
    checks: tuple[GateCheck, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> tuple[GateCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def failed_names(self) -> list[str]:
        return [c.name for c in self.failed]

    def summary(self) -> str:
        """One line: ``passes every floor`` or what fails, with values."""
        if self.passed:
            return "passes every floor of the release gate"
        below = [c.describe() for c in self.failed if not c.missing]
        missing = [c.name for c in self.failed if c.missing]
        return "; ".join([*(["fails " + "; ".join(below)] if below else []),
                          *([f"missing {', '.join(missing)}"] if missing else [])])


def _at_least(name: str, label: str, value: float | None, floor: float) -> GateCheck:
    return GateCheck(name, label, f">= {floor:.3f}", value,
                     value is not None and value >= floor)


def _at_most(name: str, label: str, value: float | None, ceiling: float) -> GateCheck:
    return GateCheck(name, label, f"<= {ceiling:.3f}", value,
                     value is not None and value <= ceiling)


def check_gate(card: Mapping[str, Any] | None, tags: Mapping[str, Any],
               floors: GateFloors) -> GateVerdict:
    """Judge one version: its model card (``leukofed.card.build_card``'s dict, None when it
    has none) and its registry tags (the ``audit_*`` numbers) against ``floors``.

    Rows, in order: macro-F1, malignant sensitivity, malignant specificity, each class's
    recall (from the card's test metrics, point estimates), conformal coverage against its
    target less ``max_coverage_shortfall``, the refer share (the card's conformal section),
    and the shortcut audit's follow-the-colour share (the version's tags, else the card's
    audit). A value that is absent, None or not finite fails its row as missing."""
    card = card or {}
    metrics = card.get("metrics") or {}
    values = (metrics.get("values") or {}) if metrics.get("measured") else {}

    def point(key: str) -> float | None:
        entry = values.get(key)
        return finite_number(entry.get("value")) if isinstance(entry, Mapping) else None

    checks = [
        _at_least("macro_f1", "macro-F1 (test)", point("macro_f1"), floors.min_macro_f1),
        _at_least("malignant_sensitivity", "malignant sensitivity",
                  point("malignant_sensitivity"), floors.min_sensitivity),
        _at_least("malignant_specificity", "malignant specificity",
                  point("malignant_specificity"), floors.min_specificity),
    ]
    for cls in card.get("classes") or CLASSES:
        checks.append(_at_least(f"recall_{cls}", f"recall {_CLASS_NAMES.get(cls, cls)}",
                                point(f"recall_{cls}"), floors.min_class_recall))

    conformal = card.get("conformal") or {}
    measured = bool(conformal.get("measured"))
    target = finite_number(conformal.get("target")) if measured else None
    achieved = finite_number(conformal.get("achieved")) if measured else None
    if target is None:
        checks.append(GateCheck(
            "coverage", "conformal coverage (no target recorded)",
            f">= target - {floors.max_coverage_shortfall:.3f}", None, False,
            note="the version records no coverage target"))
    else:
        floor = target - floors.max_coverage_shortfall
        checks.append(_at_least("coverage", f"conformal coverage (target {target:.3f})",
                                achieved, floor))
    checks.append(_at_most("refer_share", "refer share (referred as uncertain)",
                           finite_number(conformal.get("refer_share")) if measured else None,
                           floors.max_refer_share))

    follow = finite_number(tags.get("audit_follow_colour"))
    if follow is None:
        audit = card.get("audit") or {}
        follow = finite_number((audit.get("metrics") or {}).get("audit_follow_colour"))
    colour = _at_most("follow_colour", "shortcut audit: answers following the colour",
                      follow, floors.max_follow_colour)
    if not colour.passed:
        reason = audit_verdict({"audit_follow_colour": follow} if follow is not None else {},
                               floors.max_follow_colour)[1]
        if follow is None and tags.get("skipped_colour_audit"):
            # The aggregator did not audit it (services/aggregator/audit_plan.py).
            reason = f"not audited: {tags['skipped_colour_audit']}"
        colour = replace(colour, note=reason)
    checks.append(colour)
    if floors.max_membership_auc is not None:
        checks.append(_membership_check(card, tags, floors.max_membership_auc))
    return GateVerdict(tuple(checks))


def _membership_check(card: Mapping[str, Any], tags: Mapping[str, Any], ceiling: float
                      ) -> GateCheck:
    """The membership-inference audit's AUC (the card's, else the version's tag) at most
    ``ceiling``; the note says what failing means."""
    membership = card.get("membership") or {}
    auc = finite_number(membership.get("auc")) if membership.get("measured") else None
    if auc is None:
        auc = finite_number(tags.get("membership_auc"))
    check = _at_most("membership_auc", "membership audit: attack AUC (0.5: a coin)", auc,
                     ceiling)
    if check.passed:
        return check
    from leukofed.membership import reading

    if auc is None and tags.get("skipped_membership_audit"):
        return replace(check, note=f"not audited: {tags['skipped_membership_audit']}")
    return replace(check, note=reading(auc) if auc is not None else
                   "the version carries no membership audit")


def format_gate(verdict: GateVerdict) -> str:
    """The gate as a table for people: every floor, the version's value, pass or FAIL."""
    width = max(len(c.label) for c in verdict.checks)
    lines = ["release gate (floors: LEUKOFED_GATE_* or leukofed promote --min-.../--max-...):",
             f"  {'floor':<{width}}  {'bound':>8}  {'value':>7}"]
    for c in verdict.checks:
        shown = "missing" if c.value is None else f"{c.value:.3f}"
        state = "pass" if c.passed else ("FAIL (missing)" if c.missing else "FAIL")
        lines.append(f"  {c.label:<{width}}  {c.bound:>8}  {shown:>7}  {state}"
                     + (f": {c.note}" if c.note and not c.passed else ""))
    lines.append("  verdict: " + ("passes" if verdict.passed else
                                  f"fails {len(verdict.failed)} of {len(verdict.checks)} "
                                  f"floors ({', '.join(verdict.failed_names())})"))
    return "\n".join(lines)
