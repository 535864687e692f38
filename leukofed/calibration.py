"""Federated temperature scaling and class-conditional (Mondrian) split-conformal prediction.

A model's softmax says "Pre, 0.99" on images it gets wrong, so two things are fitted after
training, on the hospitals' *validation* images:

- one temperature ``T`` (Guo et al. 2017): ``softmax(log p / T)``, chosen to minimise the
  negative log-likelihood. It changes confidence, never the predicted class;
- per class ``k`` a score threshold ``q_k`` (split conformal, Vovk's Mondrian / class-
  conditional variant): the prediction set of an image holds every class with
  ``1 - p_k <= q_k``. Sets built this way contain the true class with probability at
  least the target coverage *for every class separately*, so a rare class (Benign is the
  smallest) is not traded for the common ones.

Hospitals never send per-image scores: they could single out a patient's image, and the
aggregator does not need them. Each hospital sends **sums** (``calibration_sums``) for
every temperature of a fixed grid: the summed NLL, binned reliability sums, and an
integer histogram of the non-conformity scores per true class on fixed bin edges. These
are sufficient statistics: summed over hospitals (``pool_sums``) they give exactly the
numbers one would get from the pooled images, up to the grid and the histogram's bin width.
The temperature is then a grid minimiser, ECE comes from the pooled bins, and the conformal
threshold is the upper edge of the bin holding the required rank, which rounds the
threshold up, so the coverage guarantee still holds (conservative by at most one bin).

Every dict this module returns is JSON-able (plain lists, ints and floats);
``validate_sums`` normalises received sums to that form. Pure numpy, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from leukofed.labels import CLASSES

FORMAT = "leukofed-calibration-sums/1"
CALIBRATION_FORMAT = "leukofed-calibration/1"
# 2 ** (i / 6) for i in -12..18: a geometric grid 0.25..8.0 whose 13th point is exactly
# 1.0 (np.geomspace rounds), so "before calibration" is a grid point and hospitals and
# aggregator agree on every value bit for bit.
TEMPERATURES: np.ndarray = 2.0 ** (np.arange(-12, 19) / 6.0)
ECE_BINS = 15
SCORE_BINS = 200
DEFAULT_COVERAGE = 0.95
# Shared bin edges. Bins are closed on the right, (e_j, e_j+1] (the first also holds 0), so
# a score in bin j is <= the upper edge e_j+1 and > every lower edge: "s <= q" for a
# threshold q that is an edge can be decided from the bin alone, exactly.
SCORE_EDGES: np.ndarray = np.linspace(0.0, 1.0, SCORE_BINS + 1)
_ONE = int(np.flatnonzero(TEMPERATURES == 1.0)[0])
_EPS = 1e-12  # probabilities are clipped here before the log: a zero must not give -inf


def _bin_index(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each value in [0, 1] on ``n_bins`` uniform right-closed bins."""
    edges = SCORE_EDGES if n_bins == SCORE_BINS else np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], np.clip(values, 0.0, 1.0), side="left")


def _check_temperature(temperature: float) -> float:
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a number, got {temperature!r}") from None
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return t


def _log_probs(probs: np.ndarray, temperature: float) -> np.ndarray:
    """log softmax(log p / T) along the last axis, computed in log space for stability."""
    z = np.log(np.clip(np.asarray(probs, np.float64), _EPS, None)) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities ``softmax(log(clip(p)) / T)``; the argmax never changes.

    Models hand out probabilities, not logits; ``log p`` equals the logits up to a
    per-image constant, which softmax ignores, so this is temperature scaling proper.
    """
    return np.exp(_log_probs(probs, _check_temperature(temperature)))


def _check_inputs(probs: np.ndarray, y: np.ndarray, n_classes: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, np.float64)
    labels = np.asarray(y)
    if p.size == 0 and labels.size == 0:
        return p.reshape(0, n_classes), labels.reshape(0).astype(np.int64)
    if p.ndim != 2 or p.shape[1] != n_classes:
        raise ValueError(f"probs must be (N, {n_classes}), got {p.shape}")
    if labels.shape != (len(p),):
        raise ValueError(f"y must be ({len(p)},), got {labels.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs must be finite")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 \
            or labels.max() >= n_classes:
        raise ValueError(f"y must hold integer classes in [0, {n_classes})")
    return p, labels.astype(np.int64)


def calibration_sums(probs: np.ndarray, y: np.ndarray, n_classes: int = len(CLASSES)
                     ) -> dict[str, Any]:
    """One hospital's JSON-able sums over a split, for every temperature of the grid.

    Keys: ``format``, ``temperatures``, ``n_classes``, ``count``, ``class_counts``, and
    per temperature (outer index): ``nll`` (sum of -log p_y), ``reliability`` (ECE_BINS x
    [count, sum of top-label confidence, sum correct]), ``classwise`` (n_classes x
    ECE_BINS x [count, sum p_k, sum y==k]) and ``scores`` (n_classes x SCORE_BINS counts of
    s = 1 - p_y by true class). Real-valued sums are floats, counts ints.
    """
    p, labels = _check_inputs(probs, y, n_classes)
    n = len(labels)
    onehot = np.eye(n_classes)[labels]
    # Flattened (class, bin) index so one bincount fills every class's histogram.
    offsets = np.arange(n_classes) * ECE_BINS
    nll, reliability, classwise, scores = [], [], [], []
    for t in TEMPERATURES:
        logp = _log_probs(p, float(t))
        cal = np.exp(logp)
        nll.append(float(-logp[np.arange(n), labels].sum()))
        conf = cal.max(axis=1)
        correct = (cal.argmax(axis=1) == labels).astype(np.float64)
        b = _bin_index(conf, ECE_BINS)
        reliability.append(np.stack([
            np.bincount(b, minlength=ECE_BINS),
            np.bincount(b, weights=conf, minlength=ECE_BINS),
            np.bincount(b, weights=correct, minlength=ECE_BINS),
        ], axis=1).astype(np.float64).tolist())
        idx = (_bin_index(cal, ECE_BINS) + offsets).ravel()
        size = n_classes * ECE_BINS
        classwise.append(np.stack([
            np.bincount(idx, minlength=size),
            np.bincount(idx, weights=cal.ravel(), minlength=size),
            np.bincount(idx, weights=onehot.ravel(), minlength=size),
        ], axis=1).astype(np.float64).reshape(n_classes, ECE_BINS, 3).tolist())
        # Same expression as prediction_sets (1 - calibrated p), so the bins agree with
        # the sets those scores would be judged by.
        s = 1.0 - cal[np.arange(n), labels]
        scores.append(np.bincount(labels * SCORE_BINS + _bin_index(s, SCORE_BINS),
                                  minlength=n_classes * SCORE_BINS)
                      .reshape(n_classes, SCORE_BINS).astype(int).tolist())
    return {
        "format": FORMAT,
        "temperatures": TEMPERATURES.tolist(),
        "n_classes": int(n_classes),
        "count": int(n),
        "class_counts": np.bincount(labels, minlength=n_classes).astype(int).tolist(),
        "nll": nll,
        "reliability": reliability,
        "classwise": classwise,
        "scores": scores,
    }


def _array(data: dict[str, Any], key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in data:
        raise ValueError(f"calibration sums lack {key!r}")
    try:
        raw = np.asarray(data[key])
    except (TypeError, ValueError):  # ragged nesting
        raise ValueError(f"{key!r} must be numeric, shape {shape}") from None
    # Only numbers: numpy would turn "3" into 3.0, and True into 1.
    if raw.dtype.kind not in "iuf" and raw.size:
        raise ValueError(f"{key!r} must be numeric, shape {shape}")
    a = raw.astype(np.float64)
    if a.shape != shape:
        raise ValueError(f"{key!r} must have shape {shape}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{key!r} holds a non-finite value")
    if np.any(a < 0):
        raise ValueError(f"{key!r} holds a negative value")
    return a


def _integral(a: np.ndarray, what: str) -> np.ndarray:
    if np.any(a != np.round(a)):
        raise ValueError(f"{what} must be integer counts")
    return np.round(a).astype(np.int64)


def _close_or_below(a: np.ndarray, bound: np.ndarray) -> bool:
    # Float sums of values in [0, 1] may exceed their count by rounding only.
    return bool(np.all(a <= bound * (1 + 1e-9) + 1e-9))


def validated_arrays(data: Any) -> dict[str, Any]:
    """``validate_sums`` keeping the sums as numpy arrays (int64 counts, float64 sums)."""
    if not isinstance(data, dict):
        raise ValueError(f"calibration sums must be a dict, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise ValueError(f"calibration sums format must be {FORMAT!r}, got "
                         f"{data.get('format')!r}")
    temps = data.get("temperatures")
    try:
        same_grid = np.allclose(np.asarray(temps, np.float64), TEMPERATURES,
                                rtol=1e-12, atol=0.0)
    except (TypeError, ValueError):
        same_grid = False
    if np.shape(temps) != TEMPERATURES.shape or not same_grid:
        raise ValueError("calibration sums were computed on another temperature grid")
    c = data.get("n_classes")
    if isinstance(c, bool) or not isinstance(c, int | np.integer) or c < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {c!r}")
    count = data.get("count")
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    n_t = len(TEMPERATURES)
    class_counts = _integral(_array(data, "class_counts", (c,)), "class_counts")
    nll = _array(data, "nll", (n_t,))
    rel = _array(data, "reliability", (n_t, ECE_BINS, 3))
    cw = _array(data, "classwise", (n_t, c, ECE_BINS, 3))
    scores = _integral(_array(data, "scores", (n_t, c, SCORE_BINS)), "scores")
    rel_counts = _integral(rel[..., 0], "reliability counts")
    cw_counts = _integral(cw[..., 0], "classwise counts")
    _integral(rel[..., 2], "reliability correct counts")
    cw_labels = _integral(cw[..., 2], "classwise label counts")
    if class_counts.sum() != count:
        raise ValueError(f"class_counts sum to {class_counts.sum()}, count is {count}")
    if np.any(scores.sum(axis=2) != class_counts):
        raise ValueError("a score histogram does not sum to its class count")
    if np.any(rel_counts.sum(axis=1) != count) or np.any(cw_counts.sum(axis=2) != count):
        raise ValueError("reliability bins do not sum to count")
    if np.any(cw_labels.sum(axis=2) != class_counts):
        raise ValueError("classwise label counts do not sum to class_counts")
    if not (_close_or_below(rel[..., 1], rel[..., 0]) and _close_or_below(rel[..., 2], rel[..., 0])
            and _close_or_below(cw[..., 1], cw[..., 0])
            and _close_or_below(cw[..., 2], cw[..., 0])):
        raise ValueError("a bin's sums exceed its count")
    return {
        "format": FORMAT,
        "temperatures": TEMPERATURES.tolist(),
        "n_classes": int(c),
        "count": int(count),
        "class_counts": class_counts,
        "nll": nll,
        "reliability": rel,
        "classwise": cw,
        "scores": scores,
    }


_SUMMED = ("class_counts", "nll", "reliability", "classwise", "scores")


def as_json_sums(arrays: dict[str, Any]) -> dict[str, Any]:
    """Sums held as arrays (``validated_arrays``, ``add_sums``) as plain JSON-able lists."""
    return {k: (np.asarray(v).tolist() if k in _SUMMED else v) for k, v in arrays.items()}


def validate_sums(data: Any) -> dict[str, Any]:
    """Check received sums and return them normalised: plain JSON-able lists, counts as ints.

    Raises ValueError naming the first problem: format, grid, shapes, finiteness,
    negativity, integer counts, or counts that disagree with each other.
    """
    return as_json_sums(validated_arrays(data))


def add_sums(pooled: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    """Two sets of validated sums as arrays (``validated_arrays``) added elementwise; the
    running pool of many hospitals' sums costs one set of arrays, not one per hospital."""
    if pooled is None:
        return dict(part)
    if pooled["n_classes"] != part["n_classes"]:
        raise ValueError(f"calibration sums disagree on n_classes: "
                         f"{sorted({pooled['n_classes'], part['n_classes']})}")
    out = dict(pooled)
    out["count"] = pooled["count"] + part["count"]
    for key in _SUMMED:
        out[key] = pooled[key] + part[key]
    return out


def pool_sums(sums: list[dict[str, Any]]) -> dict[str, Any]:
    """Elementwise sum of validated sums: what one hospital holding every image would send."""
    if not sums:
        raise ValueError("nothing to pool: no calibration sums")
    pooled = None
    for part in sums:
        pooled = add_sums(pooled, validated_arrays(part))
    assert pooled is not None
    return as_json_sums(pooled)


def fit_temperature(pooled: dict[str, Any]) -> float:
    """The grid temperature with the least pooled NLL; 1.0 when there are no images."""
    data = validate_sums(pooled)
    if data["count"] == 0:
        return 1.0
    return float(TEMPERATURES[int(np.argmin(data["nll"]))])


def ece_from_bins(bins: np.ndarray) -> float:
    """Top-label ECE from (ECE_BINS, 3) [count, sum confidence, sum correct]; 0.0 if empty.

    sum_b n_b / N * |mean confidence_b - accuracy_b| = sum_b |conf sum - correct sum| / N.
    """
    b = np.asarray(bins, np.float64)
    if b.ndim != 2 or b.shape[1] != 3:
        raise ValueError(f"bins must be (n_bins, 3), got {b.shape}")
    total = b[:, 0].sum()
    return float(np.abs(b[:, 1] - b[:, 2]).sum() / total) if total > 0 else 0.0


def classwise_ece_from_bins(bins: np.ndarray) -> list[float]:
    """Per-class one-vs-rest ECE from (C, ECE_BINS, 3) [count, sum p_k, sum y==k]."""
    b = np.asarray(bins, np.float64)
    if b.ndim != 3 or b.shape[2] != 3:
        raise ValueError(f"bins must be (n_classes, n_bins, 3), got {b.shape}")
    return [ece_from_bins(k) for k in b]


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS
                               ) -> float:
    """Top-label ECE of the images at hand, on the same bins as the federated sums."""
    p = np.asarray(probs, np.float64)
    p, labels = _check_inputs(p, y, p.shape[1] if p.ndim == 2 else len(CLASSES))
    if len(labels) == 0:
        return 0.0
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == labels).astype(np.float64)
    b = _bin_index(conf, bins)
    return ece_from_bins(np.stack([
        np.bincount(b, minlength=bins),
        np.bincount(b, weights=conf, minlength=bins),
        np.bincount(b, weights=correct, minlength=bins),
    ], axis=1))


def _check_coverage(coverage: float) -> float:
    try:
        c = float(coverage)
    except (TypeError, ValueError):
        raise ValueError(f"coverage must be a number, got {coverage!r}") from None
    if not 0.0 < c < 1.0:
        raise ValueError(f"coverage must be in (0, 1), got {coverage!r}")
    return c


def mondrian_quantiles(score_hist: np.ndarray, coverage: float) -> list[float]:
    """Per class threshold q_k from (C, SCORE_BINS) score counts.

    With n_k scores, rank r = ceil((n_k + 1) * coverage) (the split-conformal finite-sample
    correction); q_k is the upper edge of the bin holding the r-th smallest score, so at
    least r scores are <= q_k. When r > n_k there are too few scores to promise the
    coverage and q_k = 1.0: class k is in every set.
    """
    cov = _check_coverage(coverage)
    hist = np.asarray(score_hist)
    if hist.ndim != 2 or hist.shape[1] != SCORE_BINS:
        raise ValueError(f"score_hist must be (n_classes, {SCORE_BINS}), got {hist.shape}")
    if np.any(hist < 0):
        raise ValueError("score_hist holds a negative count")
    out = []
    for counts in hist:
        n = int(counts.sum())
        # The 1e-9 keeps float noise (20 * 0.95 = 19.000000000000004) from adding a rank.
        r = math.ceil((n + 1) * cov - 1e-9)
        if r > n:
            out.append(1.0)
            continue
        b = int(np.searchsorted(np.cumsum(counts), r, side="left"))
        out.append(float(SCORE_EDGES[b + 1]))
    return out


def prediction_sets(calibrated: np.ndarray, quantiles: Sequence[float]) -> np.ndarray:
    """(N, C) bool: class k is in an image's set when 1 - p_k <= q_k."""
    p = np.asarray(calibrated, np.float64)
    q = np.asarray(quantiles, np.float64)
    if p.ndim != 2 or q.shape != (p.shape[1],):
        raise ValueError(f"calibrated (N, C) and C quantiles expected, got {p.shape}, {q.shape}")
    return (1.0 - p) <= q


def set_coverage(sets: np.ndarray, y: np.ndarray, n_classes: int = len(CLASSES)
                 ) -> dict[str, Any]:
    """How prediction sets did on labelled images; shares are None where nothing to count."""
    s = np.asarray(sets, bool).reshape(-1, n_classes)
    labels = np.asarray(y, np.int64).reshape(-1)
    if len(labels) != len(s):
        raise ValueError(f"{len(s)} sets but {len(labels)} labels")
    n = len(labels)
    hit = s[np.arange(n), labels]
    size = s.sum(axis=1)

    def share(mask: np.ndarray) -> float | None:
        return float(mask.mean()) if mask.size else None

    return {
        "coverage": share(hit),
        "class_coverage": [share(hit[labels == k]) for k in range(n_classes)],
        "mean_set_size": share(size),
        "single_share": share(size == 1),
        "empty_share": share(size == 0),
    }


def coverage_from_scores(score_hist: np.ndarray, quantiles: Sequence[float]
                         ) -> list[float | None]:
    """Per class share of held-out scores <= q_k, from their histogram (None if no scores).

    Exact when each q_k is a bin edge, as ``mondrian_quantiles`` returns: a score is <= an
    edge exactly when its right-closed bin lies below it. So hospitals' TEST-split sums give
    the same coverage the images' sets would.
    """
    hist = np.asarray(score_hist, np.float64)
    q = np.asarray(quantiles, np.float64)
    if hist.ndim != 2 or hist.shape[1] != SCORE_BINS or q.shape != (hist.shape[0],):
        raise ValueError(f"(C, {SCORE_BINS}) histogram and C quantiles expected, got "
                         f"{hist.shape}, {q.shape}")
    out: list[float | None] = []
    for counts, qk in zip(hist, q):
        n = counts.sum()
        out.append(float(counts[SCORE_EDGES[1:] <= qk].sum() / n) if n > 0 else None)
    return out


@dataclass(frozen=True)
class Calibration:
    """What a model version carries: its temperature and per-class conformal thresholds."""

    temperature: float
    coverage: float
    quantiles: tuple[float, ...]

    def __post_init__(self) -> None:
        _check_temperature(self.temperature)
        _check_coverage(self.coverage)
        q = tuple(float(v) for v in self.quantiles)
        if not all(0.0 <= v <= 1.0 for v in q):  # also refuses NaN
            raise ValueError(f"quantiles must be in [0, 1], got {q}")
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "coverage", float(self.coverage))
        object.__setattr__(self, "quantiles", q)

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        return apply_temperature(probs, self.temperature)

    def sets(self, probs: np.ndarray) -> np.ndarray:
        """Prediction sets of RAW model probabilities (calibrated here first)."""
        return prediction_sets(self.calibrate(probs), self.quantiles)

    def to_dict(self) -> dict[str, Any]:
        return {"format": CALIBRATION_FORMAT, "temperature": self.temperature,
                "coverage": self.coverage, "quantiles": list(self.quantiles)}

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"not a calibration: format must be {CALIBRATION_FORMAT!r}")
        quantiles = data.get("quantiles")
        if not isinstance(quantiles, list | tuple) or len(quantiles) != len(CLASSES):
            raise ValueError(f"calibration needs {len(CLASSES)} quantiles, one per class")
        try:
            q = tuple(float(v) for v in quantiles)
        except (TypeError, ValueError):
            raise ValueError("calibration quantiles must be numbers") from None
        return cls(data.get("temperature"), data.get("coverage"), q)


def answered_report(calibration: Calibration, probs: np.ndarray, y: np.ndarray,
                    refer: np.ndarray | None = None) -> dict[str, Any]:
    """What a calibrated version answers on labelled images, from its RAW probabilities:
    set coverage (overall, per class), the share referred (a set that is not one class, or
    ``refer`` from another check such as the acquisition profile), accuracy on the rest,
    and ECE before and after the temperature."""
    labels = np.asarray(y, np.int64).reshape(-1)
    sets = calibration.sets(probs)
    single = sets.sum(axis=1) == 1
    answered = single if refer is None else single & ~np.asarray(refer, bool)
    answer = sets.argmax(axis=1)
    return {
        **set_coverage(sets, labels), "target": calibration.coverage,
        "set_refer_share": float(1 - single.mean()) if len(labels) else None,
        "refer_share": float(1 - answered.mean()) if len(labels) else None,
        "accuracy_answered": (float((answer[answered] == labels[answered]).mean())
                              if answered.any() else None),
        "ece_before": expected_calibration_error(probs, labels),
        "ece_after": expected_calibration_error(calibration.calibrate(probs), labels),
    }


def _grid_index(temperature: float) -> int:
    return int(np.argmin(np.abs(np.log(TEMPERATURES / temperature))))


def _mean(total: float, count: int) -> float | None:
    return total / count if count else None


def calibration_report(pooled_val: dict[str, Any], coverage: float = DEFAULT_COVERAGE,
                       pooled_test: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit T and the conformal thresholds on pooled validation sums; JSON-able report.

    "before" is the grid point T = 1.0 (the raw model), "after" the fitted T. With
    ``pooled_test`` the test split's ECE and per-class set coverage are read from its sums.
    """
    val = validate_sums(pooled_val)
    t = fit_temperature(val)
    i = _grid_index(t)
    quantiles = mondrian_quantiles(np.asarray(val["scores"][i]), coverage)
    report: dict[str, Any] = {
        "temperature": t,
        "count": val["count"],
        "nll_before": _mean(val["nll"][_ONE], val["count"]),
        "nll_after": _mean(val["nll"][i], val["count"]),
        "ece_before": ece_from_bins(val["reliability"][_ONE]),
        "ece_after": ece_from_bins(val["reliability"][i]),
        "classwise_ece_before": classwise_ece_from_bins(val["classwise"][_ONE]),
        "classwise_ece_after": classwise_ece_from_bins(val["classwise"][i]),
        "calibration": Calibration(t, coverage, tuple(quantiles)).to_dict(),
        "val_class_counts": val["class_counts"],
    }
    if pooled_test is not None:
        test = validate_sums(pooled_test)
        if test["n_classes"] != val["n_classes"]:
            raise ValueError("test and validation sums disagree on n_classes")
        hist = np.asarray(test["scores"][i])
        class_cov = coverage_from_scores(hist, quantiles)
        covered = sum(hist[k][SCORE_EDGES[1:] <= q].sum() for k, q in enumerate(quantiles))
        report.update({
            "test_count": test["count"],
            "test_ece_before": ece_from_bins(test["reliability"][_ONE]),
            "test_ece_after": ece_from_bins(test["reliability"][i]),
            "test_class_coverage": class_cov,
            "test_coverage": _mean(float(covered), test["count"]),
        })
    return report
