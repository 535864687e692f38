"""The aggregator's side of example-level differential privacy (issue 27, item 2): the run
configuration, what hospitals are told, each hospital's spent epsilon in the round summary,
MLflow and the card, and the run stopping when any hospital's budget is reached."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from test_round_loop import Clock, FakeDispatcher, FakeTracker, honest, make_run

from leukofed.card import build_card, card_markdown
from leukofed.protocol import FitReport
from leukofed.strategies import make_strategy
from services.aggregator.config import RunConfig
from services.aggregator.privacy_step import (
    BudgetReached,
    check_budget,
    example_summary,
    missing_accounting,
    privatize,
)
from services.aggregator.rounds import fit_config
from services.aggregator.tracking import _privacy_tag, card_info

EXAMPLE = {"level": "example", "target_epsilon": 2.5, "delta": 1e-5}


def _cfg(**privacy: Any) -> RunConfig:
    return RunConfig(norm="group", rounds=5, privacy={**EXAMPLE, **privacy})


# ---------------------------------------------------------------- configuration


def test_example_level_config_and_what_hospitals_are_told() -> None:
    cfg = _cfg()
    assert cfg.privacy is not None and cfg.privacy.example and cfg.privacy.calibrated
    assert not cfg.privacy.central  # no mechanism at the aggregator
    again = RunConfig(**cfg.model_dump())  # as a run record stores and reloads it
    assert again.privacy is not None and again.privacy.calibrated
    sent = fit_config(cfg, "r1", 1, make_strategy("fedavg"), 0.0)
    assert (sent["dp_level"], sent["dp_target_epsilon"], sent["dp_delta"], sent["dp_rounds"],
            sent["dp_noise_multiplier"]) == ("example", 2.5, 1e-5, 5, 0.0)
    assert sent["send_profile"] is False and sent["dp_mode"] == ""
    fixed = _cfg(noise_multiplier=1.2)
    assert fixed.privacy is not None and not fixed.privacy.calibrated


@pytest.mark.parametrize("config, message", [
    ({"privacy": EXAMPLE}, "norm 'group'"),  # BatchNorm mixes the images of a batch
    ({"norm": "group", "privacy": {"level": "example"}}, "target_epsilon"),
    ({"norm": "group", "privacy": {**EXAMPLE, "mode": "local"}}, "level 'client'"),
    ({"norm": "group", "privacy": {**EXAMPLE, "adaptive_clipping": True}}, "level 'client'"),
])
def test_example_level_configs_refused_with_the_reason(config: dict[str, Any],
                                                        message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RunConfig(**config)


# ---------------------------------------------------------------- accounting per hospital


def _report(eps: float, nxt: float, sigma: float = 1.1) -> FitReport:
    return FitReport(metrics={"loss": 1.0, "dp_epsilon": eps, "dp_epsilon_next": nxt,
                              "dp_noise_multiplier": sigma})


def test_summary_keeps_each_hospitals_spending_and_the_largest() -> None:
    cfg = _cfg()
    first = example_summary(cfg, {"a": _report(1.0, 1.6), "b": _report(0.5, 0.8)}, [])
    assert first["epsilon"] == 1.0 and first["level"] == "example"
    # b is absent from round 2: it keeps what it spent
    second = example_summary(cfg, {"a": _report(1.6, 2.1)}, [{"privacy": first}])
    assert second["hospitals"]["b"]["epsilon"] == 0.5  # type: ignore[index]
    assert second["epsilon"] == 1.6
    assert privatize(cfg, {}, ["x"], ["a"], [], 2) == (["x"], None)  # type: ignore[list-item]


def test_budget_reached_when_any_hospitals_next_round_would_exceed_the_target() -> None:
    cfg = _cfg()
    rounds = [{"privacy": example_summary(cfg, {"a": _report(1.0, 2.0),
                                                "b": _report(1.2, 2.6)}, [])}]
    with pytest.raises(BudgetReached, match="hospital b"):
        check_budget(cfg, 2, rounds)
    check_budget(cfg, 2, [{"privacy": example_summary(cfg, {"a": _report(1.0, 2.0)}, [])}])


def test_an_answer_without_accounting_is_refused() -> None:
    assert "DP-SGD" in (missing_accounting(_cfg(), FitReport(metrics={"loss": 1.0})) or "")
    assert missing_accounting(_cfg(), _report(1.0, 2.0)) is None
    assert missing_accounting(RunConfig(), FitReport()) is None


def test_mlflow_tag_and_card_say_the_unit_and_each_hospitals_epsilon() -> None:
    cfg = _cfg()
    privacy = example_summary(cfg, {"a": _report(1.0, 1.6), "b": _report(0.5, 0.8)}, [])
    tag = _privacy_tag(privacy)
    assert "one training image" in tag and "a 1" in tag and "b 0.5" in tag
    summary = {"round": 1, "participants": {"a": 10, "b": 5}, "privacy": privacy,
               "global": {}, "confusion": {}}
    info = card_info(cfg, {"id": "r1"}, summary, "leukofed")
    assert info["federation"]["privacy"]["hospitals"] == {"a": 1.0, "b": 0.5}
    card = build_card(info)
    assert card["federation"]["privacy"]["level"] == "example"
    text = card_markdown(card)
    assert "example-level differential privacy" in text and "not one patient" in text


# ---------------------------------------------------------------- the round loop


def dp_hospital(per_round: float, n: int = 4):
    """A hospital that reports example-level spending growing by ``per_round``."""
    plain = honest(1.0, n)
    done = {"rounds": 0}

    def answer(task: str, args: list[Any], hospital: str) -> dict[str, Any]:
        out = plain(task, args, hospital)
        if task.endswith("fit"):
            done["rounds"] += 1
            k = done["rounds"]
            out["metrics"] = {"loss": 1.0, "dp_epsilon": k * per_round,
                              "dp_epsilon_next": (k + 1) * per_round,
                              "dp_noise_multiplier": 1.0}
        return out
    return answer


def test_run_stops_when_any_hospitals_budget_is_reached(tmp_path) -> None:
    clock = Clock()
    tracker = FakeTracker()
    d = FakeDispatcher(clock, {"a": dp_hospital(1.0), "b": dp_hospital(0.5)},
                       live={"a", "b"})
    run = make_run(tmp_path, d, clock, tracker, rounds=5, norm="group",
                   privacy=EXAMPLE, min_fit_clients=1)
    rec = run.execute()
    # a: 1.0 after round 1, 2.0 after round 2; a third round would make it 3.0 > 2.5
    assert rec["status"] == "completed" and "hospital a" in (rec["reason"] or "")
    assert [r["round"] for r in rec["rounds"]] == [1, 2]
    last = rec["rounds"][-1]
    assert last["global"]["dp_epsilon"] == 2.0
    assert last["privacy"]["hospitals"]["b"]["epsilon"] == 1.0
    # each hospital's spent epsilon is an MLflow metric of its own (hospital/<id>/...)
    assert last["hospitals"]["a"]["train_dp_epsilon"] == 2.0


def test_an_old_hospital_that_does_not_account_is_left_out(tmp_path) -> None:
    clock = Clock()
    d = FakeDispatcher(clock, {"a": dp_hospital(0.1), "b": honest(3.0, 4)}, live={"a", "b"})
    run = make_run(tmp_path, d, clock, rounds=1, norm="group", privacy=EXAMPLE)
    rec = run.execute()
    assert rec["status"] == "completed", rec["reason"]
    assert "DP-SGD" in rec["rounds"][0]["rejected"]["b"]
    assert set(rec["rounds"][0]["participants"]) == {"a"}
    assert np.isfinite(rec["rounds"][0]["global"]["dp_epsilon"])


def test_a_hospital_refusing_for_its_budget_is_named_with_its_reason(tmp_path) -> None:
    clock = Clock()

    def refuses(task: str, args: list[Any], hospital: str) -> dict[str, Any]:
        return {"status": "declined", "hospital": hospital, "reason": "privacy_budget",
                "message": "refused: this round would take this hospital's epsilon over "
                           "all runs from 7.900 to 8.300 at delta 1e-05, above its limit 8"}

    d = FakeDispatcher(clock, {"a": dp_hospital(0.1), "b": refuses}, live={"a", "b"})
    rec = make_run(tmp_path, d, clock, rounds=1, norm="group", privacy=EXAMPLE).execute()
    assert rec["status"] == "completed", rec["reason"]
    assert "above its limit 8" in rec["rounds"][0]["failed"]["b"]
    assert any("privacy_budget" in e["message"] and "8.300" in e["message"]
               for e in rec["events"])
