"""Pure decisions of the round loop and the transport settings."""

from __future__ import annotations

import numpy as np
import pytest

from leukofed.protocol import (
    DEFAULT_IMAGE_SIZE,
    EvaluateAnswer,
    FitAnswer,
    FitReport,
    RoundConfig,
)
from leukofed.transport import (
    ACCEPTED_CONTENT,
    check_hospital_id,
    hospital_of_queue,
    make_celery,
    queue_name,
)
from services.aggregator.round_logic import (
    combine_evaluations,
    hospital_metrics,
    pooled_metrics,
    quorum_possible,
    select_hospitals,
)


def test_celery_never_accepts_pickle() -> None:
    app = make_celery("t", "redis://127.0.0.1:1/0", hospital_id="a")
    conf = app.conf
    assert conf.task_serializer == "msgpack" and conf.result_serializer == "msgpack"
    assert "pickle" not in conf.accept_content and "pickle" not in conf.result_accept_content
    assert "pickle" not in ACCEPTED_CONTENT
    assert conf.task_acks_late and conf.broker_connection_retry_on_startup
    assert conf.broker_connection_max_retries is None
    assert conf.broker_transport_options["visibility_timeout"] >= 3600
    assert [q.name for q in conf.task_queues] == ["hospital.a"]


def test_queue_names() -> None:
    assert queue_name("a") == "hospital.a"
    assert hospital_of_queue("hospital.h001") == "h001"
    assert hospital_of_queue("celery") is None
    for bad in ("", "A", "a.b", "a b", "x" * 40, "-a"):
        with pytest.raises(ValueError):
            check_hospital_id(bad)


def test_round_config_fills_defaults_drops_unknown_and_refuses_bad_values() -> None:
    cfg = RoundConfig.decode({"round": 3, "surprise": 1})  # a newer aggregator's extra key
    assert cfg.round == 3 and cfg.model == "compact_cnn" and not hasattr(cfg, "surprise")
    assert cfg.image_size == DEFAULT_IMAGE_SIZE and RoundConfig.decode(None) == RoundConfig()
    for bad, field in (({"image_size": "big"}, "image_size"), ({"round": -1}, "round"),
                       ({"local_epochs": 0}, "local_epochs"), ({"bn_mode": "x"}, "bn_mode")):
        with pytest.raises(ValueError, match=f"round configuration refused: {field}"):
            RoundConfig.decode(bad)
    with pytest.raises(ValueError, match="not a map"):
        RoundConfig.decode([1, 2])
    # The aggregator's side refuses a field no hospital knows (a typo would vanish).
    with pytest.raises(ValueError, match="imagesize"):
        RoundConfig.build(imagesize=64)
    assert RoundConfig.build(image_size=64)["image_size"] == 64


def test_select_prefers_live_and_falls_back_to_requested() -> None:
    rng = np.random.default_rng(0)
    assert select_hospitals(["a", "b", "c"], {"a", "c"}, 1.0, 1, rng) == ["a", "c"]
    # Too few live for the quorum (or liveness unknown): ask everyone requested.
    assert select_hospitals(["a", "b"], {"a"}, 1.0, 2, rng) == ["a", "b"]
    assert select_hospitals(["a", "b"], None, 1.0, 1, rng) == ["a", "b"]
    assert select_hospitals(None, {"b", "a"}, 1.0, 1, rng) == ["a", "b"]
    assert select_hospitals(None, set(), 1.0, 1, rng) == []


def test_select_fraction_never_below_quorum() -> None:
    rng = np.random.default_rng(0)
    live = {f"h{i}" for i in range(10)}
    picked = select_hospitals(None, live, 0.3, 1, rng)
    assert len(picked) == 3 and set(picked) <= live
    assert len(select_hospitals(None, live, 0.1, 4, rng)) == 4


def test_quorum_possible() -> None:
    assert quorum_possible(1, 1, 2)
    assert not quorum_possible(0, 1, 2)


def test_pooled_metrics_hand_computed() -> None:
    cm = np.array([[2, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 3]])
    m = pooled_metrics(cm, loss_sum=7.0, n=7)
    assert m["accuracy"] == pytest.approx(6 / 7)
    assert m["recall_Early"] == pytest.approx(0.5)
    # F1: Benign p=2/3 r=1 -> 0.8; Early p=1 r=.5 -> 2/3; Pro 1; Pre absent -> not averaged
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 1.0) / 3)
    assert m["loss"] == 1.0


def test_combine_evaluations_sums_confusion_matrices() -> None:
    a = {"splits": {"test": {"n": 2, "loss": 1.0, "accuracy": 1.0,
                             "confusion_matrix": [[1, 0, 0, 0], [0, 1, 0, 0], [0] * 4, [0] * 4]},
                    "val": {"n": 0}}}
    b = {"splits": {"test": {"n": 2, "loss": 3.0, "accuracy": 0.0,
                             "confusion_matrix": [[0, 1, 0, 0], [1, 0, 0, 0], [0] * 4, [0] * 4]}}}
    metrics, matrices = combine_evaluations({"a": EvaluateAnswer.decode(a),
                                             "b": EvaluateAnswer.decode(b)})
    assert metrics["test"]["accuracy"] == 0.5 and metrics["test"]["loss"] == 2.0
    assert matrices["test"][0][:2] == [1, 1]
    assert "val" not in metrics
    h = hospital_metrics(FitAnswer.decode({"metrics": {"loss": 0.5}, "num_examples": 4,
                                           "bytes": 10, "timings": {"train_s": 1.0},
                                           "weights": b""}), EvaluateAnswer.decode(a))
    assert h == {"train_loss": 0.5, "num_examples": 4.0, "bytes_sent": 10.0, "train_s": 1.0,
                 "test_accuracy": 1.0, "test_loss": 1.0, "test_n": 2.0}


def test_training_profiles_pool_exactly_and_skip_a_malformed_one() -> None:
    from leukofed.audit import stain_sums
    from leukofed.ood import AcquisitionProfile, ProfileStats
    from services.aggregator.round_logic import pool_training_profiles

    rng = np.random.default_rng(0)
    images = rng.integers(150, 256, (12, 32, 32, 3), dtype=np.uint8)
    images[:, 10:16, 10:16] = (120, 40, 170)  # a purple "cell" in each
    labels = np.arange(12) % 4
    answers = {
        "a": {"acquisition": ProfileStats.of_images(images[:5]).to_dict(),
              "stain_sums": stain_sums(images[:5], labels[:5], 4)},
        "b": {"acquisition": ProfileStats.of_images(images[5:]).to_dict(),
              "stain_sums": stain_sums(images[5:], labels[5:], 4)},
        "c": {"acquisition": {"format": "something else"}},
        "d": {},  # an older client: nothing sent
    }
    answers = {h: FitReport.decode(a) for h, a in answers.items()}
    profile, targets, skipped = pool_training_profiles(answers, ["a", "b", "c", "d"])
    whole = AcquisitionProfile.from_stats(ProfileStats.of_images(images))
    pooled = AcquisitionProfile.from_dict(profile)
    assert pooled.count == 12
    assert np.allclose(pooled.mean, whole.mean) and np.allclose(pooled.low, whole.low)
    assert np.allclose(pooled.precision, whole.precision, rtol=1e-6, atol=1e-6)
    assert targets is not None and np.asarray(targets).shape == (4, 2, 3)
    assert set(skipped) == {"c", "d"} and "unusable" in skipped["c"]
    # Only the round's accepted hospitals count.
    assert pool_training_profiles(answers, ["c"])[0] is None


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of a ~75%-accurate 4-class model, made over-confident on purpose."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    logits = rng.normal(0, 1, (n, 4))
    logits[np.arange(n), y] += 1.8
    z = 4.0 * logits
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), y


def _typed(evaluations: dict) -> dict[str, EvaluateAnswer]:
    return {h: EvaluateAnswer.decode(e) for h, e in evaluations.items()}


def _evaluation(probs: np.ndarray, y: np.ndarray) -> dict:
    from leukofed.calibration import calibration_sums

    half = len(y) // 2
    return {"splits": {name: {"n": len(yy), "calibration": calibration_sums(pp, yy)}
                       for name, pp, yy in (("val", probs[:half], y[:half]),
                                            ("test", probs[half:], y[half:]))}}


def test_calibration_pools_hospital_sums_and_leaves_out_a_malformed_one() -> None:
    from leukofed.calibration import calibration_report, calibration_sums, pool_sums
    from services.aggregator.round_logic import calibration_metrics, pool_calibration

    (pa, ya), (pb, yb) = _overconfident(800, 1), _overconfident(600, 2)
    evaluations = {"a": _evaluation(pa, ya), "b": _evaluation(pb, yb),
                   "forger": {"splits": {"val": {"n": 5, "calibration": {"format": "x"}}}}}
    report, skipped = pool_calibration(_typed(evaluations), 0.9)
    assert set(skipped) == {"forger"} and "calibration sums unusable" in skipped["forger"]
    # Pooled sums give exactly what one site holding every validation image would fit.
    whole = calibration_report(
        pool_sums([calibration_sums(np.concatenate([pa[:400], pb[:300]]),
                                    np.concatenate([ya[:400], yb[:300]]))]), 0.9,
        pool_sums([calibration_sums(np.concatenate([pa[400:], pb[300:]]),
                                    np.concatenate([ya[400:], yb[300:]]))]))
    assert report is not None
    assert report["temperature"] == whole["temperature"] > 1.5  # over-confident: T > 1
    assert report["calibration"] == whole["calibration"]
    metrics = calibration_metrics(report)
    assert metrics["val_ece_after"] < metrics["val_ece_before"] / 2
    assert metrics["test_conformal_coverage"] >= 0.88
    assert pool_calibration(_typed({"a": {"splits": {"val": {"n": 0}}}}), 0.95) == (None, {})


def test_server_test_report_measures_the_versions_prediction_sets() -> None:
    from services.aggregator.round_logic import pool_calibration, server_test_report

    probs, y = _overconfident(1600, 3)
    report, _ = pool_calibration(_typed({"a": _evaluation(probs[:800], y[:800])}), 0.95)
    flat, cm, conformal = server_test_report(y[800:], probs[800:], report)
    assert np.asarray(cm).sum() == 800
    assert conformal is not None and conformal["target"] == 0.95
    assert conformal["coverage"] >= 0.93 and flat["conformal_coverage"] == conformal["coverage"]
    # A ~75%-accurate model cannot answer 95% coverage with single classes everywhere: it
    # refers a share, and is more accurate on what it answers than overall.
    assert 0.05 < conformal["refer_share"] < 1.0
    assert conformal["accuracy_answered"] > flat["accuracy"]
    assert conformal["ece_after"] < conformal["ece_before"]
    flat_plain, _, none = server_test_report(y, probs, None)
    assert none is None and "conformal_coverage" not in flat_plain


def test_training_class_counts_for_the_card_skip_what_is_missing_or_malformed() -> None:
    from services.aggregator.round_logic import training_class_counts

    answers = {"a": {"stain_sums": {"counts": [3, 4, 5, 6]}},
               "b": {"stain_sums": {"counts": [1, -2, 3, 4]}},   # negative: left out
               "c": {},                                          # DP run: nothing sent
               "d": {"stain_sums": {"counts": [1, 2, 3, 4]}}}    # not a participant
    typed = {h: FitReport.decode(a) for h, a in answers.items()}
    assert training_class_counts(typed, ["a", "b", "c"]) == {
        "a": {"Benign": 3, "Early": 4, "Pre": 5, "Pro": 6}}


def _val_evaluation(confusion: list[list[int]]) -> EvaluateAnswer:
    n = int(np.sum(confusion))
    return EvaluateAnswer.decode({"splits": {"val": {"n": n, "confusion_matrix": confusion}},
                                  "num_examples": n})


def _diagonal(correct: list[int], wrong: list[int]) -> list[list[int]]:
    """A confusion matrix with ``correct[c]`` right and ``wrong[c]`` called class c + 1."""
    cm = np.zeros((4, 4), int)
    for c in range(4):
        cm[c, c] = correct[c]
        cm[c, (c + 1) % 4] += wrong[c]
    return cm.tolist()


def test_a_joining_hospital_is_answered_only_once_the_model_does_as_well_on_its_images(
) -> None:
    from services.aggregator.round_logic import profile_members

    # a and b established: recall Benign 0.9, Early 0.8, Pre 1.0, Pro 1.0 on their pooled val
    established_val = {"a": _val_evaluation(_diagonal([9, 8, 10, 10], [1, 2, 0, 0])),
                       "b": _val_evaluation(_diagonal([9, 8, 10, 10], [1, 2, 0, 0]))}
    # d holds Benign and Early only: the established hospitals would score
    # (20 x 0.9 + 20 x 0.8) / 40 = 0.85 at its class mix
    lagging = {**established_val, "d": _val_evaluation(_diagonal([14, 12, 0, 0], [6, 8, 0, 0]))}
    members, established, held = profile_members(["a", "b", "d"], lagging, ["a", "b"], 0.05)
    assert members == {"a", "b"} and established == {"a", "b"}
    assert "0.650" in held["d"] and "0.850" in held["d"] and "referred" in held["d"]
    # within the margin (0.825 >= 0.85 - 0.05): answered from this round on
    close = {**established_val, "d": _val_evaluation(_diagonal([17, 16, 0, 0], [3, 4, 0, 0]))}
    members, established, held = profile_members(["a", "b", "d"], close, ["a", "b"], 0.05)
    assert members == {"a", "b", "d"} and established == {"a", "b", "d"} and not held
    # once established, a bad round does not take it back out
    members, established, _ = profile_members(["a", "b", "d"], lagging, ["a", "b", "d"], 0.05)
    assert members == {"a", "b", "d"}
    # too few validation images to tell: stays referred
    few = {**established_val, "d": _val_evaluation(_diagonal([5, 5, 0, 0], [0, 0, 0, 0]))}
    members, _, held = profile_members(["a", "b", "d"], few, ["a", "b"], 0.05)
    assert members == {"a", "b"} and "10 validation images" in held["d"]
    # the run's first round: everyone is established; no probation configured: everyone
    assert profile_members(["a", "b"], established_val, None, 0.05)[:2] == (
        {"a", "b"}, {"a", "b"})
    assert profile_members(["a", "b", "d"], lagging, ["a", "b"], None)[0] == {"a", "b", "d"}
    # no established hospital took part: the profile pools who did rather than nothing
    members, established, held = profile_members(["d"], lagging, ["a", "b"], 0.05)
    assert members == {"d"} and established == {"a", "b"} and "d" in held


def test_the_pooled_profile_leaves_a_hospital_on_probation_out() -> None:
    from leukofed.ood import AcquisitionProfile, ProfileStats
    from services.aggregator.round_logic import pool_round

    rng = np.random.default_rng(1)
    images = rng.integers(150, 256, (12, 32, 32, 3), dtype=np.uint8)
    reports = {h: FitReport.decode({"acquisition": ProfileStats.of_images(part).to_dict()})
               for h, part in (("a", images[:4]), ("b", images[4:8]), ("d", images[8:]))}
    evaluations = {"a": _val_evaluation(_diagonal([9, 8, 10, 10], [1, 2, 0, 0])),
                   "b": _val_evaluation(_diagonal([9, 8, 10, 10], [1, 2, 0, 0])),
                   "d": _val_evaluation(_diagonal([14, 12, 0, 0], [6, 8, 0, 0]))}
    pooled = pool_round(reports, ["a", "b", "d"], evaluations, 0.95,
                        established=["a", "b"], probation_margin=0.05)
    assert AcquisitionProfile.from_dict(pooled.profile).count == 8
    assert pooled.established == ["a", "b"]
    assert any(h == "d" and "probation" in why for h, why in pooled.left_out)
    first = pool_round(reports, ["a", "b", "d"], evaluations, 0.95, probation_margin=0.05)
    assert AcquisitionProfile.from_dict(first.profile).count == 12
    assert first.established == ["a", "b", "d"]
