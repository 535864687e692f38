"""The shortcut audit: does a model read the cells, or the slide?

This dataset's classes differ by stain, illumination and camera as much as by biology, so
accuracy on its own test split proves little. The audit reads every number beside what a
shortcut achieves on the same split:

- ``original``: accuracy and macro-F1 on the test images as they are;
- ``recoloured``: each test image moved to another class's average stain (Reinhard
  transfer, statistics from training images only); ``follow_colour`` is the share of
  answers that name the class whose stain the image now wears;
- ``spatial``: cells and background moved to two different classes' stains, which one
  per-image normalisation cannot undo;
- ``background_only``: the stained cells painted over; a model that reads cells should be
  near chance (0.25) here;
- ``histogram``: a random forest on a 48-bin colour histogram, trained on the training
  split: what colour alone achieves.

Pure numpy in and out; the caller supplies ``predict`` (Keras, ONNX Runtime, anything).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from leukofed.metrics import classification_metrics
from leukofed.stain import (
    background_only,
    class_stain_targets,
    reinhard,
    spatial_recolour,
    stain_stats,
)

Predict = Callable[[np.ndarray], np.ndarray]  # uint8 N x S x S x 3 -> probabilities N x C

# A version whose follow-the-colour share is above this is refused by `promote best`
# unless forced (the target for the default recipe is under 3%).
DEFAULT_MAX_FOLLOW_COLOUR = 0.10
HISTOGRAM_BINS = 16


@dataclass(frozen=True)
class AuditSet:
    """The test images with their recoloured twins, prepared once per test split."""

    original: np.ndarray
    labels: np.ndarray
    recoloured: np.ndarray
    recolour_targets: np.ndarray  # the class whose stain each recoloured image wears
    spatial: np.ndarray
    background: np.ndarray
    histogram: dict[str, float]

    def __len__(self) -> int:
        return len(self.labels)


def colour_histograms(images: np.ndarray, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """(N, 3 * bins): per-channel histograms, normalised; no notion of cells at all."""
    x = np.asarray(images, np.uint8).reshape(len(images), -1, 3)
    edges = (x.astype(np.int32) * bins) // 256
    out = np.zeros((len(images), 3 * bins), np.float32)
    for c in range(3):
        for i in range(len(images)):
            out[i, c * bins:(c + 1) * bins] = np.bincount(edges[i, :, c], minlength=bins)
    return out / x.shape[1]


_NO_BASELINE = {"accuracy": float("nan"), "macro_f1": float("nan")}


def _forest_proba(train_feats: np.ndarray, train_y: np.ndarray, test_feats: np.ndarray,
                  n_classes: int, seed: int) -> np.ndarray:
    """(N_test, n_classes) probabilities of a random forest fit on histogram features."""
    from sklearn.ensemble import RandomForestClassifier

    forest = RandomForestClassifier(n_estimators=200, random_state=seed, n_jobs=-1)
    forest.fit(train_feats, train_y)
    proba = np.zeros((len(test_feats), n_classes))
    proba[:, forest.classes_] = forest.predict_proba(test_feats)
    return proba


def _scores(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    m = classification_metrics(y, proba)
    return {"accuracy": float(m["accuracy"]), "macro_f1": float(m["macro_f1"])}


def histogram_baseline(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                       test_y: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Accuracy and macro-F1 of a colour-histogram random forest on the same split."""
    if len(train_x) == 0 or len(test_x) == 0 or len(np.unique(train_y)) < 2:
        return dict(_NO_BASELINE)
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    return _scores(test_y, _forest_proba(colour_histograms(train_x), train_y,
                                         colour_histograms(test_x), n_classes, seed))


def other_classes(labels: np.ndarray, n_classes: int, shift: int = 1) -> np.ndarray:
    """For each image a class other than its own, cycling through all of them."""
    idx = np.arange(len(labels))
    offset = 1 + (idx + shift) % (n_classes - 1)
    return (labels + offset) % n_classes


def histogram_crossfit(images: np.ndarray, labels: np.ndarray, seed: int = 0
                       ) -> dict[str, float]:
    """The colour baseline where no training images are at hand (the aggregator): two folds
    of the test split, each class cut into a first and a second half of its (sorted, so
    block-contiguous) images; train on one half, test on the other, pool the answers."""
    if len(labels) == 0:
        return dict(_NO_BASELINE)
    first = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        first[idx[: len(idx) // 2]] = True
    n_classes = int(labels.max()) + 1
    proba = np.zeros((len(labels), n_classes))
    feats = colour_histograms(images)
    for train_mask in (first, ~first):
        if len(np.unique(labels[train_mask])) < 2 or (~train_mask).sum() == 0:
            return dict(_NO_BASELINE)
        proba[~train_mask] = _forest_proba(feats[train_mask], labels[train_mask],
                                           feats[~train_mask], n_classes, seed)
    return _scores(labels, proba)


def stain_sums(images: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Per class: image count and the sum of the images' stain statistics (2 x 3 each).

    Aggregate numbers a hospital can send; pooled by ``targets_from_sums`` they give the
    class stain targets exactly as ``class_stain_targets`` does on the pooled images."""
    stats = np.stack([stain_stats(im) for im in images]) if len(images) else np.zeros((0, 2, 3))
    return {"counts": [int((labels == c).sum()) for c in range(n_classes)],
            "sums": [stats[labels == c].sum(0).tolist() if (labels == c).any()
                     else np.zeros((2, 3)).tolist() for c in range(n_classes)]}


def targets_from_sums(parts: list[dict[str, Any]], n_classes: int) -> np.ndarray | None:
    """(n_classes, 2, 3) class stain targets pooled from hospitals' ``stain_sums``; a class
    no hospital has gets the all-class average; None when nothing usable was sent."""
    counts = np.zeros(n_classes)
    sums = np.zeros((n_classes, 2, 3))
    for part in parts:
        c = np.asarray(part.get("counts", []), np.float64)
        s = np.asarray(part.get("sums", []), np.float64)
        if c.shape != (n_classes,) or s.shape != (n_classes, 2, 3) or (c < 0).any() \
                or not np.isfinite(s).all():
            continue
        counts += c
        sums += s
    if counts.sum() == 0:
        return None
    overall = sums.sum(0) / counts.sum()
    return np.stack([sums[k] / counts[k] if counts[k] else overall for k in range(n_classes)])


def prepare_audit_set(test_x: np.ndarray, test_y: np.ndarray, targets: np.ndarray,
                      histogram: dict[str, float]) -> AuditSet:
    """Recolour the test images once (deterministic) to the given class stain targets."""
    n_classes = len(targets)
    stain_of = other_classes(test_y, n_classes)
    background_of = other_classes(test_y, n_classes, shift=2)
    if len(test_x) == 0:
        raise ValueError("the shortcut audit needs test images")
    recoloured = np.stack([reinhard(im, targets[t]) for im, t in zip(test_x, stain_of)])
    spatial = np.stack([spatial_recolour(im, targets[a], targets[b])
                        for im, a, b in zip(test_x, stain_of, background_of)])
    background = np.stack([background_only(im) for im in test_x])
    return AuditSet(np.asarray(test_x, np.uint8), np.asarray(test_y), recoloured, stain_of,
                    spatial, background, histogram)


def audit_set_from_train(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                         test_y: np.ndarray, n_classes: int, seed: int = 0) -> AuditSet:
    """Centralized training: stain targets and the colour baseline from the training split."""
    return prepare_audit_set(test_x, test_y, class_stain_targets(train_x, train_y, n_classes),
                             histogram_baseline(train_x, train_y, test_x, test_y, seed))


def run_audit(predict: Predict, audit: AuditSet, original: np.ndarray | None = None
              ) -> dict[str, float]:
    """The audit's numbers for one model, flat (MLflow metrics and version tags).
    ``original``: the model's probabilities on ``audit.original`` when the caller has them
    already (the aggregator's server-test predictions): a quarter of the audit's cost."""
    y = audit.labels
    if original is not None and np.shape(original)[0] != len(y):
        raise ValueError(f"{np.shape(original)[0]} original probabilities for {len(y)} images")
    out: dict[str, float] = {}
    for name, images in (("original", audit.original), ("recoloured", audit.recoloured),
                         ("spatial", audit.spatial), ("background_only", audit.background)):
        probs = original if name == "original" and original is not None else predict(images)
        m = classification_metrics(y, probs)
        out[f"audit_{name}_accuracy"] = float(m["accuracy"])
        out[f"audit_{name}_macro_f1"] = float(m["macro_f1"])
        if name == "recoloured":
            pred = probs.argmax(axis=1)
            out["audit_follow_colour"] = float(np.mean(pred == audit.recolour_targets))
    out["audit_histogram_accuracy"] = audit.histogram["accuracy"]
    out["audit_histogram_macro_f1"] = audit.histogram["macro_f1"]
    out["audit_worst_macro_f1"] = min(out["audit_original_macro_f1"],
                                      out["audit_recoloured_macro_f1"])
    out["audit_images"] = float(len(y))
    return out


def audit_verdict(metrics: dict[str, Any], max_follow_colour: float = DEFAULT_MAX_FOLLOW_COLOUR
                  ) -> tuple[bool, str]:
    """(passes, reason) for promotion: a version that follows the colour is refused."""
    follow = metrics.get("audit_follow_colour")
    if follow is None:
        return False, "no shortcut audit recorded for this version"
    follow = float(follow)
    if not follow <= max_follow_colour:  # NaN fails too
        return False, (f"{follow:.1%} of recoloured test images follow the new colour "
                       f"(bound {max_follow_colour:.0%}): the model reads stain, not cells")
    return True, f"follow-the-colour {follow:.1%} <= {max_follow_colour:.0%}"


# The audit's rows as people read them: (words, accuracy key, macro-F1 key).
AUDIT_ROWS: tuple[tuple[str, str, str], ...] = (
    ("original", "audit_original_accuracy", "audit_original_macro_f1"),
    ("recoloured to another class's stain", "audit_recoloured_accuracy",
     "audit_recoloured_macro_f1"),
    ("cells and background recoloured apart", "audit_spatial_accuracy",
     "audit_spatial_macro_f1"),
    ("background only (chance 0.25 is good)", "audit_background_only_accuracy",
     "audit_background_only_macro_f1"),
    ("colour-histogram forest (colour alone)", "audit_histogram_accuracy",
     "audit_histogram_macro_f1"),
)


def format_audit(metrics: dict[str, Any]) -> str:
    """A short table for people (leukofed promote, leukofed evaluate)."""
    def get(key: str) -> str:
        value = metrics.get(key)
        return "-" if value is None else f"{float(value):.3f}"

    rows = AUDIT_ROWS
    lines = [f"{'shortcut audit':<42}{'accuracy':>10}{'macro-F1':>10}"]
    lines += [f"{label:<42}{get(a):>10}{get(f):>10}" for label, a, f in rows]
    lines.append(f"{'answers following the new colour':<42}{get('audit_follow_colour'):>10}")
    return "\n".join(lines)
