"""Federated calibration: sums pool exactly, temperature scaling undoes over- and
under-confidence, and class-conditional conformal sets reach their coverage per class."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from leukofed.calibration import (
    ECE_BINS,
    FORMAT,
    SCORE_BINS,
    SCORE_EDGES,
    TEMPERATURES,
    Calibration,
    apply_temperature,
    calibration_report,
    calibration_sums,
    classwise_ece_from_bins,
    coverage_from_scores,
    ece_from_bins,
    expected_calibration_error,
    fit_temperature,
    mondrian_quantiles,
    pool_sums,
    prediction_sets,
    set_coverage,
    validate_sums,
)
from leukofed.labels import CLASSES

ONE = int(np.flatnonzero(TEMPERATURES == 1.0)[0])
INTEGER_KEYS = ("count", "class_counts", "scores")
FLOAT_KEYS = ("nll", "reliability", "classwise")


def calibrated_model(y: np.ndarray, seed: int, mu: float = 1.85) -> np.ndarray:
    """Probabilities of a perfectly calibrated ~80%-accurate 4-class model.

    Features z = mu * onehot(y) + N(0, I); with uniform classes the Bayes posterior is
    softmax(mu * z), so these probabilities are calibrated by construction.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(len(y), len(CLASSES)))
    z[np.arange(len(y)), y] += mu
    logits = mu * z
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def labels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, len(CLASSES), n)


def per_class(n_per_class: int) -> np.ndarray:
    return np.repeat(np.arange(len(CLASSES)), n_per_class)


def assert_same_sums(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in INTEGER_KEYS:
        assert a[key] == b[key], key
    for key in FLOAT_KEYS:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-9, err_msg=key)


# --- the grid and temperature scaling ---------------------------------------------------

def test_temperature_grid_is_geometric_and_holds_exactly_one() -> None:
    assert TEMPERATURES.shape == (31,)
    assert TEMPERATURES[0] == 0.25 and TEMPERATURES[-1] == 8.0
    assert np.count_nonzero(TEMPERATURES == 1.0) == 1
    ratios = TEMPERATURES[1:] / TEMPERATURES[:-1]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-12)


def test_apply_temperature_at_one_is_identity_and_never_changes_argmax() -> None:
    y = labels(500, 1)
    p = calibrated_model(y, 2)
    np.testing.assert_allclose(apply_temperature(p, 1.0), p, atol=1e-6)
    for t in (0.25, 0.6, 1.7, 8.0):
        q = apply_temperature(p, t)
        np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-12)
        assert np.array_equal(q.argmax(axis=1), p.argmax(axis=1)), t
    # T > 1 softens, T < 1 sharpens the top probability
    assert np.all(apply_temperature(p, 2.0).max(axis=1) <= p.max(axis=1) + 1e-12)
    assert np.all(apply_temperature(p, 0.5).max(axis=1) >= p.max(axis=1) - 1e-12)


@pytest.mark.parametrize("t", [0.0, -1.0, math.nan, math.inf, "hot", None])
def test_apply_temperature_refuses_a_bad_temperature(t: Any) -> None:
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(np.full((2, 4), 0.25), t)


def test_an_over_confident_model_is_calibrated_back() -> None:
    y = labels(8000, 3)
    honest = calibrated_model(y, 4)
    assert 0.75 < np.mean(honest.argmax(axis=1) == y) < 0.85
    over = apply_temperature(honest, 0.25)  # logits scaled by 4
    report = calibration_report(calibration_sums(over, y))
    assert report["temperature"] > 1.5
    assert report["ece_after"] < report["ece_before"] / 2
    assert report["nll_after"] < report["nll_before"]
    assert max(report["classwise_ece_after"]) < min(report["classwise_ece_before"])


def test_an_under_confident_model_gets_a_temperature_below_one() -> None:
    y = labels(8000, 5)
    under = apply_temperature(calibrated_model(y, 6), 2.0)
    report = calibration_report(calibration_sums(under, y))
    assert report["temperature"] < 1.0
    assert report["ece_after"] < report["ece_before"] / 2


# --- the sums ---------------------------------------------------------------------------

def test_sums_of_two_halves_pool_to_the_sums_of_the_whole() -> None:
    y = labels(3001, 7)
    p = apply_temperature(calibrated_model(y, 8), 0.5)
    whole = calibration_sums(p, y)
    pooled = pool_sums([calibration_sums(p[:1234], y[:1234]), calibration_sums(p[1234:], y[1234:])])
    assert_same_sums(pooled, whole)
    assert pooled["count"] == 3001
    assert fit_temperature(pooled) == fit_temperature(whole)
    a, b = calibration_report(pooled), calibration_report(whole)
    assert a["calibration"] == b["calibration"]
    for key in ("nll_before", "nll_after", "ece_before", "ece_after", "classwise_ece_after"):
        assert a[key] == pytest.approx(b[key], rel=1e-12), key


def test_sums_are_json_and_survive_a_round_trip() -> None:
    y = labels(200, 9)
    sums = calibration_sums(calibrated_model(y, 10), y)
    again = json.loads(json.dumps(sums))
    assert again["format"] == FORMAT
    assert validate_sums(again) == sums
    assert np.shape(sums["reliability"]) == (len(TEMPERATURES), ECE_BINS, 3)
    assert np.shape(sums["classwise"]) == (len(TEMPERATURES), len(CLASSES), ECE_BINS, 3)
    assert np.shape(sums["scores"]) == (len(TEMPERATURES), len(CLASSES), SCORE_BINS)
    assert sums["class_counts"] == np.bincount(y, minlength=4).tolist()


def test_empty_input_gives_valid_sums_with_count_zero() -> None:
    sums = calibration_sums(np.zeros((0, 4)), np.zeros(0, np.int64))
    assert validate_sums(sums)["count"] == 0
    assert fit_temperature(sums) == 1.0
    y = labels(50, 11)
    full = calibration_sums(calibrated_model(y, 12), y)
    assert_same_sums(pool_sums([sums, full]), full)
    report = calibration_report(sums)
    assert report["calibration"]["quantiles"] == [1.0] * 4  # nothing seen: every class in
    json.dumps(report, allow_nan=False)


def _malformed() -> list[tuple[str, Any, str]]:
    y = np.array([0, 0, 1, 2, 3, 3])
    good = calibration_sums(calibrated_model(y, 13), y)
    cases: list[tuple[str, Any, str]] = [("not a dict", [good], "dict")]

    def variant(name: str, match: str, change: Any) -> None:
        bad = copy.deepcopy(good)
        change(bad)
        cases.append((name, bad, match))

    variant("wrong format", "format", lambda d: d.update(format="leukofed-calibration-sums/0"))
    variant("other grid", "grid", lambda d: d.update(temperatures=d["temperatures"][::-1]))
    variant("short nll", "nll", lambda d: d["nll"].pop())
    variant("wrong score bins", "scores", lambda d: [h.append(0) for t in d["scores"] for h in t])
    variant("nan nll", "non-finite", lambda d: d["nll"].__setitem__(3, math.nan))
    variant("string counts", "class_counts", lambda d: d.update(class_counts=["2", "1", "1", "2"]))

    def negative(d: dict[str, Any]) -> None:  # class total kept: only the sign is wrong
        d["scores"][0][0][0] -= 3
        d["scores"][0][0][1] += 3
    variant("negative count", "negative", negative)
    variant("fractional count", "integer", lambda d: d["scores"][0][0].__setitem__(0, 0.5))
    variant("histogram vs class count", "histogram",
            lambda d: d["scores"][5][1].__setitem__(7, d["scores"][5][1][7] + 1))
    variant("class counts vs count", "count", lambda d: d.update(count=7))
    variant("bool count", "count", lambda d: d.update(count=True))
    return cases


@pytest.mark.parametrize(("name", "data", "match"), _malformed(), ids=lambda v: str(v)[:24])
def test_validate_sums_refuses_malformed_data(name: str, data: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_sums(data)


def test_pool_sums_refuses_nothing_and_mixed_class_counts() -> None:
    with pytest.raises(ValueError, match="nothing"):
        pool_sums([])
    y3 = np.array([0, 1, 2])
    with pytest.raises(ValueError, match="n_classes"):
        pool_sums([calibration_sums(np.full((3, 3), 1 / 3), y3, n_classes=3),
                   calibration_sums(np.full((3, 4), 0.25), y3)])


def test_calibration_sums_refuses_bad_inputs() -> None:
    with pytest.raises(ValueError, match="probs"):
        calibration_sums(np.full((3, 3), 1 / 3), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="y must"):
        calibration_sums(np.full((3, 4), 0.25), np.array([0, 1, 4]))


# --- ECE --------------------------------------------------------------------------------

def test_ece_from_bins_by_hand() -> None:
    bins = np.zeros((ECE_BINS, 3))
    bins[9] = [10, 6.5, 5]   # 10 images at confidence 0.65, 5 right: gap 0.15
    bins[14] = [30, 29, 27]  # 30 at ~0.97, 27 right: gap 0.0667
    assert ece_from_bins(bins) == pytest.approx((1.5 + 2.0) / 40)
    assert ece_from_bins(np.zeros((ECE_BINS, 3))) == 0.0
    assert classwise_ece_from_bins(np.stack([bins, np.zeros((ECE_BINS, 3))])) == pytest.approx(
        [3.5 / 40, 0.0])


def test_federated_ece_equals_the_direct_ece() -> None:
    y = labels(1000, 14)
    p = apply_temperature(calibrated_model(y, 15), 0.4)
    sums = calibration_sums(p, y)
    assert ece_from_bins(np.asarray(sums["reliability"][ONE])) == pytest.approx(
        expected_calibration_error(p, y), abs=1e-12)
    i = int(np.flatnonzero(TEMPERATURES == 2.0)[0])
    assert ece_from_bins(np.asarray(sums["reliability"][i])) == pytest.approx(
        expected_calibration_error(apply_temperature(p, 2.0), y), abs=1e-12)
    assert expected_calibration_error(p, y) > 0.1  # over-confident: clearly miscalibrated


# --- conformal --------------------------------------------------------------------------

def test_class_conditional_coverage_on_exchangeable_data() -> None:
    y_cal, y_test = per_class(2000), per_class(2000)
    # Both splits from the same (over-confident) model and distribution: exchangeable.
    p_cal = apply_temperature(calibrated_model(y_cal, 16), 0.5)
    p_test = apply_temperature(calibrated_model(y_test, 17), 0.5)
    report = calibration_report(calibration_sums(p_cal, y_cal), 0.95,
                                calibration_sums(p_test, y_test))
    cal = Calibration.from_dict(report["calibration"])
    direct = set_coverage(cal.sets(p_test), y_test)
    for c in direct["class_coverage"]:
        assert abs(c - 0.95) <= 0.02 and c >= 0.93, direct["class_coverage"]
    assert report["test_class_coverage"] == direct["class_coverage"]
    assert report["test_coverage"] == pytest.approx(direct["coverage"])
    assert direct["mean_set_size"] > 1.2  # an ~80% model needs more than one class, often
    assert direct["single_share"] < 0.9


def test_mondrian_quantiles_by_hand() -> None:
    hist = np.zeros((3, SCORE_BINS), np.int64)
    hist[0, 10] = 100      # 100 scores in (0.05, 0.055]
    hist[1, 3] = 18        # 18 scores: (18 + 1) * 0.95 = 18.05 -> rank 19 > 18
    hist[2, :19] = 1       # 19 scores: rank ceil(20 * 0.95) = 19, the largest one
    q = mondrian_quantiles(hist, 0.95)
    assert q == [SCORE_EDGES[11], 1.0, SCORE_EDGES[19]]
    assert q[0] == pytest.approx(0.055)
    hist[0, 150] = 100     # the 191st of 200 lies among the high ones
    assert mondrian_quantiles(hist, 0.95)[0] == pytest.approx(0.755)
    assert mondrian_quantiles(np.zeros((2, SCORE_BINS)), 0.9) == [1.0, 1.0]


@pytest.mark.parametrize("coverage", [0.0, 1.0, 1.5, -0.1, math.nan])
def test_mondrian_quantiles_refuses_a_bad_coverage(coverage: float) -> None:
    with pytest.raises(ValueError, match="coverage"):
        mondrian_quantiles(np.ones((4, SCORE_BINS)), coverage)


def test_histogram_quantiles_never_cover_less_than_exact_ones() -> None:
    y = per_class(300)
    p = apply_temperature(calibrated_model(y, 18), 0.7)
    i = int(np.flatnonzero(TEMPERATURES == 0.5)[0])
    q = mondrian_quantiles(np.asarray(calibration_sums(p, y)["scores"][i]), 0.9)
    s = 1 - apply_temperature(p, 0.5)[np.arange(len(y)), y]
    for k in range(4):
        exact = np.sort(s[y == k])[math.ceil(301 * 0.9) - 1]
        assert exact <= q[k] <= exact + 1 / SCORE_BINS


def test_coverage_from_scores_equals_the_sets_coverage_on_the_same_images() -> None:
    y_cal, y_test = per_class(400), labels(1500, 19)
    p_cal = calibrated_model(y_cal, 20)
    p_test = apply_temperature(calibrated_model(y_test, 21), 0.8)  # a shift: not 0.95 here
    t = 1.4142135623730951
    i = int(np.argmin(np.abs(TEMPERATURES - t)))
    q = mondrian_quantiles(np.asarray(calibration_sums(p_cal, y_cal)["scores"][i]), 0.9)
    sets = Calibration(float(TEMPERATURES[i]), 0.9, tuple(q)).sets(p_test)
    from_sums = coverage_from_scores(np.asarray(calibration_sums(p_test, y_test)["scores"][i]), q)
    assert from_sums == set_coverage(sets, y_test)["class_coverage"]
    assert coverage_from_scores(np.zeros((4, SCORE_BINS)), q) == [None] * 4


def test_sets_can_be_empty_or_hold_several_classes() -> None:
    p = np.array([[0.25, 0.25, 0.25, 0.25], [0.45, 0.45, 0.05, 0.05], [0.97, 0.01, 0.01, 0.01]])
    tight = prediction_sets(p, [0.1] * 4)
    assert tight.tolist() == [[False] * 4, [False] * 4, [True, False, False, False]]
    loose = prediction_sets(p, [0.6] * 4)
    assert loose.sum(axis=1).tolist() == [0, 2, 1]
    everything = prediction_sets(p, [0.1, 1.0, 0.1, 0.1])  # q = 1: class 1 always in
    assert everything[:, 1].all()
    summary = set_coverage(loose, np.array([0, 1, 0]))
    assert summary == {"coverage": pytest.approx(2 / 3), "class_coverage": [0.5, 1.0, None, None],
                       "mean_set_size": 1.0, "single_share": pytest.approx(1 / 3),
                       "empty_share": pytest.approx(1 / 3)}
    with pytest.raises(ValueError):
        prediction_sets(p, [0.5] * 3)


# --- the calibration a model carries ----------------------------------------------------

def test_calibration_round_trip() -> None:
    cal = Calibration(1.7817974362806785, 0.95, (0.3, 0.455, 1.0, 0.02))
    data = json.loads(json.dumps(cal.to_dict()))
    assert data == {"format": "leukofed-calibration/1", "temperature": 1.7817974362806785,
                    "coverage": 0.95, "quantiles": [0.3, 0.455, 1.0, 0.02]}
    again = Calibration.from_dict(data)
    assert again == cal
    p = calibrated_model(labels(20, 22), 23)
    np.testing.assert_array_equal(again.calibrate(p), apply_temperature(p, cal.temperature))
    np.testing.assert_array_equal(again.sets(p), prediction_sets(again.calibrate(p), cal.quantiles))


def _good_calibration() -> dict[str, Any]:
    return {"format": "leukofed-calibration/1", "temperature": 1.2, "coverage": 0.95,
            "quantiles": [0.2, 0.3, 0.4, 0.5]}


@pytest.mark.parametrize(("change", "match"), [
    ({"format": "leukofed-calibration/0"}, "format"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": None}, "temperature"),
    ({"coverage": 1.0}, "coverage"),
    ({"coverage": 0.0}, "coverage"),
    ({"quantiles": [0.2, 0.3, 0.4]}, "quantiles"),
    ({"quantiles": [0.2, 0.3, 0.4, 1.5]}, "quantiles"),
    ({"quantiles": [0.2, 0.3, 0.4, -0.1]}, "quantiles"),
    ({"quantiles": [0.2, 0.3, 0.4, math.nan]}, "quantiles"),
    ({"quantiles": [0.2, 0.3, 0.4, "x"]}, "quantiles"),
    ({"quantiles": 0.5}, "quantiles"),
])
def test_calibration_from_dict_refuses(change: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Calibration.from_dict({**_good_calibration(), **change})
    with pytest.raises(ValueError, match="format"):
        Calibration.from_dict([_good_calibration()])


def test_calibration_report_is_json_and_indexes_before_at_one() -> None:
    y = labels(600, 24)
    p = apply_temperature(calibrated_model(y, 25), 0.5)
    val, test = calibration_sums(p[:400], y[:400]), calibration_sums(p[400:], y[400:])
    report = json.loads(json.dumps(calibration_report(val, 0.9, test), allow_nan=False))
    i = int(np.flatnonzero(report["temperature"] == TEMPERATURES)[0])
    assert report["nll_before"] == pytest.approx(val["nll"][ONE] / 400)
    assert report["nll_after"] == pytest.approx(min(val["nll"]) / 400)
    assert report["test_ece_after"] == pytest.approx(ece_from_bins(test["reliability"][i]))
    assert report["test_ece_before"] == pytest.approx(expected_calibration_error(p[400:], y[400:]))
    assert report["val_class_counts"] == np.bincount(y[:400], minlength=4).tolist()
    assert Calibration.from_dict(report["calibration"]).coverage == 0.9
    counts = np.bincount(y[400:], minlength=4)
    assert report["test_coverage"] == pytest.approx(
        np.dot(report["test_class_coverage"], counts) / counts.sum())


# --- real data --------------------------------------------------------------------------

@pytest.mark.realdata
def test_real_data_conformal_sets_from_hospital_sums(real_data: Path) -> None:
    """Three hospitals' validation sums, pooled, give sets whose per-class coverage on the
    TEST split is read exactly from the test sums.

    The model is a logistic regression on the shortcut audit's colour histograms: no
    training of the network, smooth probabilities. Measured on seed 0 (LR, 428 val / 422
    test images): test coverage per class [1.0, 0.929, 0.961, 0.960] at 0.95, which is not
    within 2 points for every class, and un-binned conformal gives the same. With 64-129
    images per class that is sampling: even exchangeable scores put all four classes within
    2 points only ~7% of the time. So the coverage is checked against the 99% interval that
    exchangeable split conformal predicts for these counts (a beta-binomial).
    """
    from scipy.stats import betabinom
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from leukofed.audit import colour_histograms
    from leukofed.data import scan_dataset
    from leukofed.splits import group_split
    from leukofed.train import load_arrays

    split = group_split(scan_dataset(real_data, verify=False).records, seed=0)
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
        load_arrays(split[name], 64) for name in ("train", "val", "test"))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    model.fit(colour_histograms(train_x), train_y)
    p_val = model.predict_proba(colour_histograms(val_x))
    p_test = model.predict_proba(colour_histograms(test_x))

    hospitals = [calibration_sums(p_val[h::3], val_y[h::3]) for h in range(3)]
    pooled = pool_sums([json.loads(json.dumps(s)) for s in hospitals])
    assert_same_sums(pooled, calibration_sums(p_val, val_y))
    report = calibration_report(pooled, 0.95, calibration_sums(p_test, test_y))
    # T = 1 is on the grid, so the fitted T can only lower the NLL. Not necessarily the ECE:
    # this LR is calibrated already (val ECE 0.010 at T = 1, 0.017 at the fitted T = 1.12).
    assert report["nll_after"] <= report["nll_before"]

    cal = Calibration.from_dict(report["calibration"])
    direct = set_coverage(cal.sets(p_test), test_y)
    assert report["test_class_coverage"] == direct["class_coverage"]

    val_counts, test_counts = np.bincount(val_y, minlength=4), np.bincount(test_y, minlength=4)
    for k, coverage in enumerate(direct["class_coverage"]):
        n, m = int(val_counts[k]), int(test_counts[k])
        r = math.ceil((n + 1) * 0.95 - 1e-9)
        assert r <= n, "too few validation images for a 0.95 set"
        low, high = betabinom(m, r, n + 1 - r).interval(0.99)
        assert low / m <= coverage <= high / m, (CLASSES[k], coverage, direct["class_coverage"])
    assert direct["coverage"] >= 0.93, direct


@pytest.mark.realdata
def test_real_data_class_coverage_over_block_splits_is_within_two_points(
        real_data: Path) -> None:
    """What split conformal promises is coverage in expectation over the calibration draw,
    per class with Mondrian quantiles. One split of 64-129 images per class cannot show it
    to 2 points (see above), so this averages 20 block splits (patients never straddle
    calibration and test): per-class mean coverage at 0.95 measured 0.961 / 0.957 / 0.955 /
    0.933 (Benign / Early / Pre / Pro; 2026-11-29), each within 2 points. The blocks are
    acquisitions, so this includes the shift between them (seed 1: Pre 0.85)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from leukofed.audit import colour_histograms
    from leukofed.data import scan_dataset
    from leukofed.splits import group_split
    from leukofed.train import load_arrays

    records = scan_dataset(real_data, verify=False).records
    x, y = load_arrays(records, 64)
    features = colour_histograms(x)
    index = {r.path: i for i, r in enumerate(records)}
    per_split = []
    for seed in range(20):
        split = group_split(records, seed=seed)
        train, val, test = ([index[r.path] for r in split[name]]
                            for name in ("train", "val", "test"))
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        model.fit(features[train], y[train])
        report = calibration_report(
            calibration_sums(model.predict_proba(features[val]), y[val]), 0.95,
            calibration_sums(model.predict_proba(features[test]), y[test]))
        per_split.append(report["test_class_coverage"])
    mean = np.mean(np.asarray(per_split, np.float64), axis=0)
    assert np.all(np.abs(mean - 0.95) <= 0.02), dict(zip(CLASSES, mean.round(3)))
