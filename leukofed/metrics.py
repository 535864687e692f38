"""Classification metrics as plain numpy over (labels, probabilities): no framework needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leukofed.labels import BENIGN_INDEX, CLASSES


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties averaged."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = 15) -> float:
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def _safe_div(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: tuple[str, ...] = CLASSES
) -> dict[str, object]:
    """Accuracy, macro-F1, per-class precision/recall/F1/AUC, confusion matrix, ECE, and
    malignant-vs-benign sensitivity and specificity (malignant = any class but Benign)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n = len(classes)
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, n)
    per_class: dict[str, dict[str, float]] = {}
    f1s = []
    for i, name in enumerate(classes):
        tp = cm[i, i]
        precision = _safe_div(tp, cm[:, i].sum())
        recall = _safe_div(tp, cm[i, :].sum())
        f1 = _safe_div(2 * precision * recall, precision + recall)
        f1s.append(f1)
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": int(cm[i, :].sum()),
            "roc_auc": roc_auc(probs[:, i], y_true == i),
        }
    malignant_true = y_true != BENIGN_INDEX
    malignant_pred = y_pred != BENIGN_INDEX
    aucs = [v["roc_auc"] for v in per_class.values() if not np.isnan(v["roc_auc"])]
    return {
        "n": int(len(y_true)),
        "accuracy": _safe_div(np.trace(cm), cm.sum()),
        "macro_f1": float(np.mean(f1s)),
        "macro_roc_auc": float(np.mean(aucs)) if aucs else float("nan"),
        "ece": expected_calibration_error(probs, y_true) if len(y_true) else 0.0,
        "malignant_sensitivity": _safe_div(
            (malignant_pred & malignant_true).sum(), malignant_true.sum()
        ),
        "malignant_specificity": _safe_div(
            (~malignant_pred & ~malignant_true).sum(), (~malignant_true).sum()
        ),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
    }


def flat_metrics(metrics: dict[str, object], prefix: str = "") -> dict[str, float]:
    """Scalar metrics only, per-class ones as ``recall_Benign`` etc.: what MLflow logs."""
    out = {
        f"{prefix}{k}": float(v)  # type: ignore[arg-type]
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    for name, vals in metrics.get("per_class", {}).items():  # type: ignore[union-attr]
        for key in ("precision", "recall", "f1"):
            out[f"{prefix}{key}_{name}"] = float(vals[key])
    return out


def plot_confusion_matrix(
    cm: list[list[int]] | np.ndarray, classes: tuple[str, ...] | list[str], path: str | Path,
    title: str = "Confusion matrix",
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(4.8, 4.2), dpi=120)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            color = "white" if cm[i, j] > threshold else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=color)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
