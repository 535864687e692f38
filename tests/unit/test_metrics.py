"""Metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from leukofed.metrics import (
    classification_metrics,
    expected_calibration_error,
    flat_metrics,
    plot_confusion_matrix,
    roc_auc,
)


def test_metrics_on_a_hand_worked_example() -> None:
    # true:  B  B  E  E  P  R      predicted: B  E  E  E  P  B
    y = np.array([0, 0, 1, 1, 2, 3])
    probs = np.array([
        [0.9, 0.1, 0.0, 0.0],
        [0.4, 0.6, 0.0, 0.0],
        [0.1, 0.8, 0.1, 0.0],
        [0.0, 0.7, 0.3, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.5, 0.0, 0.0, 0.5],  # tie: argmax takes the first (Benign)
    ])
    m = classification_metrics(y, probs)
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    pc = m["per_class"]
    # Benign: tp 1, predicted 2, true 2 -> P 0.5, R 0.5, F1 0.5
    assert (pc["Benign"]["precision"], pc["Benign"]["recall"]) == (0.5, 0.5)
    # Early: tp 2, predicted 3, true 2 -> P 2/3, R 1, F1 0.8
    assert pc["Early"]["f1"] == pytest.approx(0.8)
    # Pro: never predicted -> P 0, R 0, F1 0
    assert pc["Pro"]["f1"] == 0.0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 1.0 + 0.0) / 4)
    # malignant = E, P, R. True malignant: 4, predicted malignant among them: 3 (Pro -> Benign)
    assert m["malignant_sensitivity"] == pytest.approx(3 / 4)
    # True benign: 2, predicted benign among them: 1
    assert m["malignant_specificity"] == pytest.approx(1 / 2)
    flat = flat_metrics(m, "val_")
    assert flat["val_recall_Early"] == 1.0 and "val_confusion_matrix" not in flat


def test_roc_auc_by_hand() -> None:
    # positives scored 0.8, 0.4; negatives 0.6, 0.2: pairs won 3 of 4 -> 0.75
    assert roc_auc(np.array([0.8, 0.4, 0.6, 0.2]), np.array([1, 1, 0, 0], bool)) == 0.75
    # a tie counts one half: pos 0.5 vs neg 0.5 -> 0.5
    assert roc_auc(np.array([0.5, 0.5]), np.array([1, 0], bool)) == 0.5
    assert math.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1], bool)))


def test_ece_by_hand() -> None:
    # Two predictions at confidence 0.9 (one right) and two at 0.6 (both right):
    # bin 0.9: |0.5 - 0.9| * 2/4 = 0.2 ; bin 0.6: |1.0 - 0.6| * 2/4 = 0.2 -> 0.4
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y = np.array([0, 1, 0, 0])
    assert expected_calibration_error(probs, y) == pytest.approx(0.4)


def test_confusion_matrix_png(tmp_path) -> None:
    path = plot_confusion_matrix([[3, 1], [0, 4]], ["A", "B"], tmp_path / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
