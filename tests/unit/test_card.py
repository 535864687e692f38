"""The model card: bootstrap intervals from a confusion matrix, and a card that shows exactly
the numbers it was given."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

from leukofed.card import (
    CARD_FORMAT,
    NOT_MEASURED,
    bootstrap_intervals,
    build_card,
    card_html,
    card_markdown,
    card_summary,
)
from leukofed.labels import CLASSES
from leukofed.metrics import classification_metrics

CM = [[90, 5, 3, 2],
      [10, 110, 5, 2],
      [1, 3, 100, 4],
      [0, 1, 2, 84]]

CALIBRATION = {
    "temperature": 1.43, "ece_before": 0.0521, "ece_after": 0.0214,
    "classwise_ece_before": 0.031, "classwise_ece_after": 0.018,
    "nll_before": 0.311, "nll_after": 0.247, "test_ece_before": 0.061, "test_ece_after": 0.029,
    "test_coverage": 0.905, "test_class_coverage": [0.9, 0.91, 0.9, 0.92],
    "calibration": {"coverage": 0.9, "quantiles": [0.8, 0.8, 0.8, 0.8]},
}
AUDIT = {
    "audit_original_accuracy": 0.957, "audit_original_macro_f1": 0.955,
    "audit_recoloured_accuracy": 0.945, "audit_recoloured_macro_f1": 0.941,
    "audit_follow_colour": 0.024, "audit_spatial_accuracy": 0.924,
    "audit_spatial_macro_f1": 0.921, "audit_background_only_accuracy": 0.431,
    "audit_background_only_macro_f1": 0.402, "audit_histogram_accuracy": 0.983,
    "audit_histogram_macro_f1": 0.981, "audit_worst_macro_f1": 0.941, "audit_images": 422.0,
}


def _info(**changes: object) -> dict:
    info = {
        "model_name": "leukofed-all", "version": "7", "run_id": "run-abc",
        "created": "2026-11-29", "model": "compact_cnn", "image_size": 128,
        "recipe": {"cell_focus": True, "augmentation": "stain"},
        "training": {"hospitals": {
            "<script>alert('x')</script>": {
                "num_examples": 600, "fingerprint": "ab12",
                "class_counts": {"Benign": 101, "Early": 202, "Pre": 203, "Pro": 94}},
            "hospital-b": {"num_examples": 713, "class_counts": None, "fingerprint": "cd34"},
        }, "partition": "3 hospitals, labs, seed 0"},
        "federation": {"strategy": "fedavg", "rounds": 15, "round": 12,
                       "privacy": {"epsilon": 8.0, "delta": 1e-5}, "secure_aggregation": True},
        "test": {"source": "server held-out test split", "confusion": CM},
        "calibration": CALIBRATION,
        "conformal_test": {"coverage": 0.912, "class_coverage": [0.9, 0.92, 0.9, 0.93],
                           "refer_share": 0.064, "accuracy_answered": 0.973},
        "audit": AUDIT,
        "referred_share": 0.028, "acquisition_profile_images": 1895,
    }
    info.update(changes)
    return info


def _per_image(cm: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Labels and one-hot probabilities whose confusion matrix is ``cm``."""
    y, pred = [], []
    for i, row in enumerate(cm):
        for j, n in enumerate(row):
            y += [i] * n
            pred += [j] * n
    return np.array(y), np.eye(len(cm))[pred]


# --------------------------------------------------------------------------- bootstrap


def test_point_values_equal_leukofed_metrics() -> None:
    m = classification_metrics(*_per_image(CM))
    b = bootstrap_intervals(CM)
    assert set(b) == {"accuracy", "macro_f1", "malignant_sensitivity",
                      "malignant_specificity", *(f"recall_{c}" for c in CLASSES)}
    assert b["accuracy"]["value"] == pytest.approx(m["accuracy"])
    assert b["macro_f1"]["value"] == pytest.approx(m["macro_f1"])
    assert b["malignant_sensitivity"]["value"] == pytest.approx(m["malignant_sensitivity"])
    assert b["malignant_specificity"]["value"] == pytest.approx(m["malignant_specificity"])
    for c in CLASSES:
        assert b[f"recall_{c}"]["value"] == pytest.approx(m["per_class"][c]["recall"])


def test_point_values_by_hand() -> None:
    b = bootstrap_intervals(CM)
    # 384 of 422 on the diagonal; malignant rows 1-3 predicted as any of classes 1-3.
    assert b["accuracy"]["value"] == pytest.approx(384 / 422)
    assert b["malignant_sensitivity"]["value"] == pytest.approx((127 - 10 + 108 - 1 + 87) / 322)
    assert b["malignant_specificity"]["value"] == pytest.approx(90 / 100)
    assert b["recall_Early"]["value"] == pytest.approx(110 / 127)


def test_intervals_contain_the_point_and_narrow_with_ten_times_the_images() -> None:
    small = bootstrap_intervals(CM)
    large = bootstrap_intervals(np.asarray(CM) * 10)
    for key, v in small.items():
        assert v["low"] <= v["value"] <= v["high"], key
        assert large[key]["value"] == pytest.approx(v["value"]), key
        if v["high"] - v["low"] > 0:  # recall of a class never missed has no width
            assert large[key]["high"] - large[key]["low"] < v["high"] - v["low"], key
    assert small["accuracy"]["high"] - small["accuracy"]["low"] > 0.02
    assert large["accuracy"]["high"] - large["accuracy"]["low"] < 0.6 * (
        small["accuracy"]["high"] - small["accuracy"]["low"])


def test_deterministic_for_a_seed() -> None:
    assert bootstrap_intervals(CM, seed=3) == bootstrap_intervals(CM, seed=3)
    assert bootstrap_intervals(CM, seed=3) != bootstrap_intervals(CM, seed=4)


def test_a_wider_level_gives_a_wider_interval() -> None:
    narrow = bootstrap_intervals(CM, level=0.5)["accuracy"]
    wide = bootstrap_intervals(CM, level=0.99)["accuracy"]
    assert wide["low"] < narrow["low"] < narrow["high"] < wide["high"]


def test_vectorised_thousand_draws_well_under_a_second() -> None:
    start = time.perf_counter()
    bootstrap_intervals(np.asarray(CM) * 100, n_boot=1000)
    assert time.perf_counter() - start < 0.5


def test_a_class_missing_from_the_test_split_has_no_interval() -> None:
    cm = [[5, 1, 0, 0], [1, 6, 0, 0], [0, 0, 4, 0], [0, 0, 0, 0]]
    b = bootstrap_intervals(cm)
    assert b["recall_Pro"]["value"] == 0.0  # as leukofed.metrics says
    assert np.isnan(b["recall_Pro"]["low"]) and np.isnan(b["recall_Pro"]["high"])
    card = build_card(_info(test={"source": "x", "confusion": cm}))
    json.dumps(card, allow_nan=False)
    assert card["metrics"]["values"]["recall_Pro"]["low"] is None
    assert "| recall Pro-B | 0.000 [n/a, n/a] |" in card_markdown(card)


def test_an_all_zero_matrix_is_empty() -> None:
    with pytest.raises(ValueError, match="empty"):
        bootstrap_intervals(np.zeros((4, 4), dtype=int))


@pytest.mark.parametrize("bad", [[], [[0, 0], [0, 0]], np.zeros((4, 4)), [[1, 2, 3]],
                                 [[1, -1], [0, 3]]])
def test_empty_or_malformed_confusion_raises(bad: object) -> None:
    with pytest.raises(ValueError):
        bootstrap_intervals(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the card


def test_card_is_json_and_carries_the_given_numbers() -> None:
    card = build_card(_info())
    assert json.loads(json.dumps(card, allow_nan=False)) == card
    assert card["format"] == CARD_FORMAT
    assert card["model"]["version"] == "7"
    assert card["metrics"]["n_images"] == 422
    assert card["metrics"]["values"]["accuracy"] == pytest.approx(
        bootstrap_intervals(CM)["accuracy"])
    assert card["calibration"]["ece_after"] == 0.0214
    assert card["conformal"]["target"] == 0.9
    assert card["conformal"]["achieved"] == 0.912
    assert card["audit"]["passes"] is True
    assert card["training"]["total_examples"] == 1313
    assert card["training"]["class_counts"] is None  # one hospital did not report them
    assert {x["title"] for x in card["limitations"]} >= {
        "Single source laboratory", "Classes confounded with acquisition batches",
        "Image-level labels", "File-number blocks as a patient proxy",
        "Simulated laboratories are not real ones"}


def test_summary_shows_exactly_the_numbers() -> None:
    card = build_card(_info())
    b = bootstrap_intervals(CM)
    summary = card_summary(card)
    lines = summary.splitlines()
    assert 4 <= len(lines) <= 8
    acc = re.search(r"accuracy (\d\.\d{3}) \[(\d\.\d{3}), (\d\.\d{3})\]", summary)
    assert acc is not None
    assert [float(g) for g in acc.groups()] == [
        round(b["accuracy"][k], 3) for k in ("value", "low", "high")]
    sens = re.search(r"malignant sensitivity (\d\.\d{3}) \[(\d\.\d{3}), (\d\.\d{3})\]", summary)
    assert sens is not None
    assert float(sens.group(1)) == round(b["malignant_sensitivity"]["value"], 3)
    assert "ECE 0.052 -> 0.021" in summary
    assert re.search(r"coverage 0\.912 achieved vs 0\.900 target, refer share 0\.064", summary)
    assert "follow-the-colour 0.024 (bound 0.10, passes)" in summary
    assert "main limitation: single source laboratory" in summary


def test_markdown_and_html_show_exactly_the_numbers() -> None:
    card = build_card(_info())
    b = bootstrap_intervals(CM)
    md, page = card_markdown(card), card_html(card)
    acc = "{value:.3f} [{low:.3f}, {high:.3f}]".format(**b["accuracy"])
    recall = "{value:.3f} [{low:.3f}, {high:.3f}]".format(**b["recall_Early"])
    assert f"| accuracy | {acc} |" in md
    assert f"| recall Early Pre-B | {recall} |" in md
    assert f"<td>accuracy</td><td>{acc}</td>" in page
    for text in (acc, recall, "0.052", "0.021", "0.912", "0.064", "0.024", "0.983", "1895",
                 "fedavg", "run-abc", "Pro-B"):
        assert text in md, text
        assert text in page, text
    got = re.search(r"\| malignant sensitivity[^|]*\| (\d\.\d{3}) \[", md)
    assert got is not None and float(got.group(1)) == round(
        b["malignant_sensitivity"]["value"], 3)
    for section in ("Intended use", "Not for", "Training data", "Federation", "Metrics",
                    "Calibration", "Conformal", "audit", "Known limitations"):
        assert section in md and section in page, section
    assert "hematologist" in md and "Bone marrow" in md


def test_html_is_standalone_and_escapes_a_hostile_hospital_name() -> None:
    card = build_card(_info(model_name="<b>evil</b>", test={
        "source": "<img src=x onerror=alert(1)>", "confusion": CM}))
    page = card_html(card)
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()
    assert "<b>evil" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "&lt;b&gt;evil&lt;/b&gt;" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert "<script" not in card_markdown(card).lower()


def test_missing_sections_say_not_measured() -> None:
    assert NOT_MEASURED == "not measured for this version"
    card = build_card({"model_name": "m", "version": 1})
    json.dumps(card, allow_nan=False)
    for key in ("training", "federation", "metrics", "calibration", "conformal", "audit",
                "membership", "referral"):
        assert card[key]["measured"] is False, key
        assert card[key]["note"] == NOT_MEASURED, key
    md, page, summary = card_markdown(card), card_html(card), card_summary(card)
    for label in ("Training data", "Federation", "Test metrics", "Calibration",
                  "Conformal coverage", "Shortcut audit", "Membership-inference audit",
                  "Out-of-distribution referral"):
        assert f"{label}: {NOT_MEASURED}" in md, label
        assert f"{label}: {NOT_MEASURED}" in page, label
    assert summary.count(NOT_MEASURED) == 5
    assert "Single source laboratory" in md and "main limitation" in summary


def test_a_zero_test_matrix_is_not_measured_in_a_card() -> None:
    card = build_card(_info(test={"source": "x", "confusion": np.zeros((4, 4)).tolist()}))
    assert card["metrics"]["measured"] is False


def test_coverage_falls_back_to_the_calibration_report() -> None:
    card = build_card(_info(conformal_test=None))
    assert card["conformal"]["achieved"] == 0.905
    assert card["conformal"]["refer_share"] is None
    assert "coverage 0.905 achieved vs 0.900 target, refer share n/a" in card_summary(card)


def test_a_version_that_follows_the_colour_is_read_as_such() -> None:
    card = build_card(_info(audit={**AUDIT, "audit_follow_colour": 0.36,
                                   "audit_recoloured_accuracy": 0.545}))
    assert card["audit"]["passes"] is False
    assert "follow-the-colour 0.360 (bound 0.10, FAILS)" in card_summary(card)
    reading = " ".join(card["audit"]["reading"])
    assert "above the bound" in reading and "0.412 below original" in reading


def test_name_and_version_are_required() -> None:
    with pytest.raises(ValueError):
        build_card({"model_name": "m"})
    with pytest.raises(ValueError):
        build_card({"version": "1"})
