"""Which versions a round audits (services/aggregator/audit_plan.py): with ``audits:
promotable`` only a version whose server-test numbers reach the gate's other floors, round 1
(the membership reference) and the last round; every version is still registered; a skipped
one says why and the gate refuses it as not audited. Also the round's timing fields."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from test_round_loop import Clock, FakeDispatcher, FakeTracker, honest, make_run

from leukofed.audit import stain_sums
from leukofed.calibration import calibration_sums
from leukofed.gate import GateFloors, check_gate, format_gate
from leukofed.ood import ProfileStats
from services.aggregator.audit_plan import audit_skipped, server_card
from services.aggregator.config import RunConfig

RNG = np.random.default_rng(0)
Y = np.repeat(np.arange(4), 50)  # the server test split: 50 images a class
IMAGES = RNG.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
LABELS = np.arange(8) % 4


def probs(labels: np.ndarray, correct: float) -> np.ndarray:
    """Confident answers, right on the first ``correct`` share of each class."""
    out = np.full((len(labels), 4), 0.01)
    for c in range(4):
        idx = np.nonzero(labels == c)[0]
        right = idx[: int(round(correct * len(idx)))]
        out[right, c] = 0.97
        wrong = np.setdiff1d(idx, right)
        out[wrong, (c + 1) % 4] = 0.97
    return out


def hospital(task: str, args: list[Any], name: str) -> dict[str, Any]:
    """A hospital that sends the stain sums (the colour audit's targets) and calibration
    sums on its confident, correct answers (so coverage and refer share reach the gate)."""
    answer = honest(1.0, 10)(task, args, name)
    if task.endswith("fit"):
        answer["acquisition"] = ProfileStats.of_images(IMAGES).to_dict()
        answer["stain_sums"] = stain_sums(IMAGES, LABELS, 4)
    if task.endswith("evaluate"):
        y = np.repeat(np.arange(4), 60)
        sums = calibration_sums(probs(y, 1.0), y)
        cm = np.diag([60] * 4).tolist()
        answer["splits"] = {s: {"n": 240, "loss": 0.1, "accuracy": 1.0,
                                "confusion_matrix": cm, "calibration": sums}
                            for s in ("val", "test")}
    return answer


class AuditOps:
    """Server predictions whose quality is set per round (``quality[round - 1]``), and an
    audit that records what it was given."""

    def __init__(self, quality: list[float]) -> None:
        self.quality = quality
        self.calls = 0
        self.audited: list[np.ndarray | None] = []

    def initial(self, cfg: RunConfig) -> tuple[dict[str, np.ndarray], set[str]]:
        return {"dense/kernel": np.zeros((2, 2), np.float32)}, set()

    def server_predictions(self, cfg: RunConfig, weights: Any) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        return Y, probs(Y, self.quality[self.calls - 1])

    def server_audit(self, cfg: RunConfig, weights: Any, stain_targets: Any,
                     original: np.ndarray | None = None) -> dict[str, float]:
        self.audited.append(original)
        return {"audit_follow_colour": 0.02, "audit_original_accuracy": 1.0}


def membership_asked(d: FakeDispatcher) -> list[int]:
    return [c["membership_images"] for _, task, c in d.sent if task.endswith("evaluate")]


def run_with(tmp_path, quality: list[float], **config: Any):
    clock = Clock()
    tracker = FakeTracker()
    ops = AuditOps(quality)
    d = FakeDispatcher(clock, {"a": hospital})
    run = make_run(tmp_path, d, clock, tracker, ops, hospitals=["a"], rounds=len(quality),
                   bn_mode="average", **config)
    return run.execute(), ops, d


def test_only_promotable_versions_and_the_first_and_last_rounds_are_audited(tmp_path) -> None:
    # Round 2 is far below the floors, round 3 reaches them, round 4 (the last) does not.
    rec, ops, d = run_with(tmp_path, [0.5, 0.5, 1.0, 0.5])
    assert rec["status"] == "completed", rec["reason"]
    assert rec["versions"] == {"1": "1", "2": "2", "3": "3", "4": "4"}  # every version
    # Membership: round 1 (the reference), round 3 (promotable), round 4 (the last).
    assert membership_asked(d) == [512, 0, 512, 512]
    # Colour: round 3 and the last; each with the server predictions, not predicted again.
    assert len(ops.audited) == 2 and all(o is not None and len(o) == len(Y)
                                         for o in ops.audited)
    rounds = rec["rounds"]
    assert set(rounds[0]["audit_skipped"]) == {"colour"}
    assert set(rounds[1]["audit_skipped"]) == {"colour", "membership"}
    assert "macro_f1" in rounds[1]["audit_skipped"]["membership"]
    assert "audit_skipped" not in rounds[2] and "audit_skipped" not in rounds[3]
    assert "audit_follow_colour" in rounds[2]["global"]
    assert "audit_follow_colour" not in rounds[1]["global"]
    # Every round says where its time went, registration included (run status shows it).
    for r in rounds:
        assert {"round_s", "fit_wall_s", "eval_s", "slowest_eval_client_s", "server_test_s",
                "audit_s", "log_s", "register_s", "track_s"} <= set(r["timings"])


def test_every_version_is_audited_when_asked(tmp_path) -> None:
    rec, ops, d = run_with(tmp_path, [0.5, 0.5, 0.5], audits="every")
    assert rec["status"] == "completed", rec["reason"]
    assert membership_asked(d) == [512, 512, 512] and len(ops.audited) == 3
    assert all("audit_skipped" not in r for r in rec["rounds"])


def test_without_membership_images_nothing_is_asked_or_skipped_for_it(tmp_path) -> None:
    rec, _, d = run_with(tmp_path, [0.5, 0.5, 0.5], membership_images=0)
    assert membership_asked(d) == [0, 0, 0]
    assert all("membership" not in r.get("audit_skipped", {}) for r in rec["rounds"])


def test_the_decision_reads_the_gate_floors_of_the_aggregator(monkeypatch) -> None:
    cfg = RunConfig()
    cm = np.diag([50] * 4)
    cm[0, 0], cm[0, 1] = 40, 10  # Benign recall 0.8, specificity 0.8
    cm = cm.tolist()
    reason = audit_skipped(cfg, GateFloors(), cm, None, None, forced=False,
                           before_calibration=True)
    assert reason is not None and "recall_Benign 0.800" in reason
    assert "coverage" not in reason  # not known before the hospitals' calibration
    monkeypatch.setenv("LEUKOFED_GATE_MIN_CLASS_RECALL", "0.8")
    monkeypatch.setenv("LEUKOFED_GATE_MIN_SPECIFICITY", "0.8")
    monkeypatch.setenv("LEUKOFED_GATE_MIN_MACRO_F1", "0.8")
    assert audit_skipped(cfg, GateFloors(), cm, None, None, forced=False,
                         before_calibration=True) is None
    # After calibration, a version without any is not promotable: no audit.
    assert "coverage missing" in (audit_skipped(cfg, GateFloors(), cm, None, None,
                                                forced=False) or "")
    assert audit_skipped(cfg, GateFloors(), cm, None, None, forced=True) is None
    assert audit_skipped(cfg, GateFloors(), None, None, None, forced=False) is None


def test_server_card_reads_as_the_registered_card_for_the_gate() -> None:
    card = server_card(np.diag([50] * 4).tolist(), None, None)
    verdict = check_gate(card, {"audit_follow_colour": "0.01"}, GateFloors())
    assert verdict.failed_names() == ["coverage", "refer_share"]


@pytest.mark.parametrize("tag, row", [("skipped_colour_audit", "follow_colour"),
                                      ("skipped_membership_audit", "membership_auc")])
def test_the_gate_refuses_a_skipped_audit_as_not_audited(tag: str, row: str) -> None:
    card = server_card(np.diag([50] * 4).tolist(), None, None)
    verdict = check_gate(card, {tag: "cannot be promoted: macro_f1 0.500 (floor >= 0.930)"},
                         GateFloors(max_membership_auc=0.6))
    check = next(c for c in verdict.checks if c.name == row)
    assert not check.passed and check.missing
    assert check.note.startswith("not audited: cannot be promoted")
    assert "not audited" in format_gate(verdict)


def test_run_status_shows_where_a_round_went() -> None:
    from services.aggregator.cli import timing_line

    t = {"round_s": 40.0, "fit_wall_s": 30.0, "eval_s": 6.0, "server_test_s": 2.5,
         "audit_s": 0.0, "log_s": 0.5, "register_s": 3.0, "card_s": 0.2,
         "register_keras_s": 1.3, "onnx_s": 1.5, "track_s": 3.5}
    line = timing_line(t, {"colour": "cannot be promoted: ..."})
    assert line.startswith("time: round 43.5 s = fit 30.0, evaluate 6.0, server test 2.5, "
                           "colour audit 0.0, MLflow log 0.5, register 3.0 (card 0.2, "
                           "Keras 1.3, ONNX 1.5)")
    assert line.endswith("audits skipped (cannot be promoted): colour")
    assert timing_line({}, {}) == ""
