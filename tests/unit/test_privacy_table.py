"""benchmarks/privacy_table.py: rows, the time ratio and the target check from results
files shaped as bench_federated.py writes them (made up here: no training)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
# benchmarks/common.py turns on the services' development mode for the whole process when
# imported (benchmarks start bare services); the tests after this one must not inherit it.
_DEV_MODE = os.environ.get("LEUKOFED_DEV_MODE")
import privacy_table  # noqa: E402

if _DEV_MODE is None:
    os.environ.pop("LEUKOFED_DEV_MODE", None)


def scenario(name: str, privacy: dict[str, Any] | None, accuracy: float, epsilon: float | None,
             auc: float, fit_s: float, sensitivity: float = 0.97, batch: int = 128,
             norm: str = "group") -> dict[str, Any]:
    rounds = [{"round": r, "fit_wall_s": fit_s, "round_s": fit_s + 5} for r in (1, 2)]
    return {
        "scenario": name, "privacy": privacy, "norm": norm, "recipe": "new", "hospitals": 3,
        "scheme": "iid", "labs": True, "image_size": 128, "batch_size": batch,
        "local_epochs": 2, "rounds": rounds,
        "summary": {"final_test_accuracy": accuracy, "final_test_macro_f1": accuracy - 0.01,
                    "best_test_accuracy": accuracy, "dp_epsilon": epsilon,
                    "mean_round_s": fit_s + 5},
        "final": {"audit": {"audit_original_accuracy": accuracy,
                            "audit_recoloured_accuracy": accuracy - 0.02,
                            "audit_follow_colour": 0.03, "audit_histogram_accuracy": 0.9},
                  "membership": {"membership_auc": auc, "membership_tpr_at_1pct_fpr": 0.01},
                  "malignant": {"sensitivity": sensitivity, "specificity": 0.9},
                  "referred": {"in_distribution_test": 0.04},
                  "calibration": {"server_test_set_refer_share": 0.06}},
    }


def write(path: Path, scenarios: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"scenarios": scenarios}))
    return path


def test_rows_levels_time_ratio_and_target(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(privacy_table, "ROOT", tmp_path)
    example = write(tmp_path / "example.json", [
        scenario("none-gn", None, 0.80, None, 0.51, fit_s=10.0),
        scenario("eps8", {"level": "example", "target_epsilon": 8, "delta": 1e-5}, 0.60,
                 7.9, 0.50, fit_s=25.0),
        scenario("eps20", {"level": "example", "target_epsilon": 20, "delta": 1e-5}, 0.90,
                 19.8, 0.52, fit_s=30.0),
    ])
    client = write(tmp_path / "client.json", [
        scenario("dp0.1", {"mode": "central", "noise_multiplier": 0.1}, 0.15, 1510.0, 0.5,
                 fit_s=5.0, batch=32)])
    # The DP row has no federated colour audit, only the offline one (audit_final_versions)
    scenarios = json.loads(example.read_text())["scenarios"]
    scenarios[1]["final"]["audit"] = {}
    scenarios[1]["final"]["audit_offline"] = {
        "audit_original_accuracy": 0.60, "audit_recoloured_accuracy": 0.55,
        "audit_follow_colour": 0.2, "audit_histogram_accuracy": 0.9}
    write(example, scenarios)
    doc = privacy_table.build(example, client)
    rows = {r["scenario"]: r for r in doc["rows"]}
    assert [rows[n]["level"] for n in ("none-gn", "eps8", "dp0.1")] == [
        "none", "example", "client"]
    assert rows["none-gn"]["epsilon"] is None and rows["eps8"]["epsilon"] == 7.9
    assert rows["eps8"]["delta"] == 1e-5 and rows["eps8"]["target_epsilon"] == 8
    # DP fit time against the non-private row of the same norm, batch and budget
    assert rows["eps8"]["fit_time_ratio_to_non_private"] == 2.5
    assert rows["dp0.1"]["fit_time_ratio_to_non_private"] is None  # no companion there
    assert abs(rows["eps8"]["recolouring_gap_points"] - 5.0) < 1e-9
    assert rows["eps8"]["audit_source"] == "offline"
    assert rows["none-gn"]["audit_source"] == "federated"
    assert abs(rows["none-gn"]["recolouring_gap_points"] - 2.0) < 1e-9
    # the card's refer share (prediction sets), and the acquisition check's apart
    assert rows["eps8"]["referred_test"] == 0.06
    assert rows["eps8"]["outside_profile_test"] == 0.04
    assert rows["eps8"]["malignant_sensitivity"] == 0.97
    assert rows["eps8"]["membership_auc"] == 0.50
    # eps20 is accurate but above epsilon 8; eps8 is private enough but not accurate
    assert doc["target_met_by"] == []
    md = privacy_table.markdown(doc)
    assert "**no row**" in md and "| example | 7.90 |" in md


def test_target_met_when_a_row_passes_every_floor(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(privacy_table, "ROOT", tmp_path)
    example = write(tmp_path / "example.json", [
        scenario("eps8", {"level": "example", "target_epsilon": 8, "delta": 1e-5}, 0.88,
                 7.5, 0.53, fit_s=20.0),
        scenario("eps3", {"level": "example", "target_epsilon": 3, "delta": 1e-5}, 0.87,
                 2.9, 0.50, fit_s=20.0, sensitivity=0.90),  # sensitivity under 0.95
    ])
    doc = privacy_table.build(example, tmp_path / "absent.json")
    assert doc["target_met_by"] == ["eps8"]
