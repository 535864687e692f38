"""The membership-inference audit's maths (leukofed.membership): histograms pooled over
hospitals give the per-image AUC within the binning, leakage is detected, exchangeable
members and non-members read about 0.5."""

from __future__ import annotations

import numpy as np
import pytest

from leukofed import membership as mi


def _pooled(parts: list[dict]) -> dict:
    pooled = None
    for part in parts:
        pooled = mi.add_histograms(pooled, mi.validate_histograms(part))
    assert pooled is not None
    return pooled


def test_pooled_histograms_give_the_per_image_auc_within_the_binning() -> None:
    rng = np.random.default_rng(1)
    # Three hospitals of different sizes; members have somewhat lower losses.
    member_losses = [rng.lognormal(-2.0, 1.5, n) for n in (40, 300, 170)]
    nonmember_losses = [rng.lognormal(-1.2, 1.5, n) for n in (25, 90, 60)]
    parts = [mi.hospital_histograms(m, n) for m, n in zip(member_losses, nonmember_losses)]
    pooled = _pooled(parts)["loss"]
    m_all, n_all = np.concatenate(member_losses), np.concatenate(nonmember_losses)
    # Exactly the histogram of one hospital holding every image...
    assert np.array_equal(pooled["members"], mi.histogram("loss", mi.statistic("loss", m_all)))
    assert np.array_equal(pooled["nonmembers"],
                          mi.histogram("loss", mi.statistic("loss", n_all)))
    # ...whose AUC is the per-image one within half the pairs sharing a bin.
    exact = mi.auc_from_scores(mi.statistic("loss", m_all), mi.statistic("loss", n_all))
    binned = float(mi.auc_from_histograms(pooled["members"], pooled["nonmembers"]))
    bound = mi.auc_binning_bound(pooled["members"], pooled["nonmembers"])
    assert abs(binned - exact) <= bound + 1e-12
    assert bound < 0.01 and abs(binned - exact) < 0.005, (binned, exact, bound)
    assert 0.6 < exact < 0.75
    report = mi.attack_report(_pooled(parts), hospitals=3)
    assert report is not None and report["members"] == 510 and report["nonmembers"] == 175
    assert report["attack"] == "loss" and report["hospitals"] == 3
    low, high = report["auc_interval"]
    assert low < report["auc"] < high and high - low < 0.15


def test_tpr_at_fpr_is_read_at_bin_edges() -> None:
    members = np.array([5, 3, 2, 0])
    nonmembers = np.array([0, 1, 9, 90])
    assert float(mi.tpr_at_fpr(members, nonmembers, 0.0)) == 0.5
    assert float(mi.tpr_at_fpr(members, nonmembers, 0.01)) == 0.8
    assert float(mi.tpr_at_fpr(members, nonmembers, 0.1)) == 1.0
    assert float(mi.advantage(members, nonmembers)) == pytest.approx(0.9)


def test_an_overfitted_model_is_detected_and_exchangeable_sets_read_about_one_half() -> None:
    """A tiny softmax model memorises 16 random images (random labels: nothing to
    generalise); its members' losses are far below those of 400 images it never saw."""
    rng = np.random.default_rng(0)
    d, classes = 64, 4
    x_in, y_in = rng.normal(size=(16, d)), rng.integers(0, classes, 16)
    x_out, y_out = rng.normal(size=(400, d)), rng.integers(0, classes, 400)
    w = np.zeros((d, classes))
    for _ in range(300):  # plain gradient descent on the members only
        z = x_in @ w
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        w -= 0.5 * x_in.T @ (p - np.eye(classes)[y_in]) / len(y_in)

    def probs(x: np.ndarray) -> np.ndarray:
        z = x @ w
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    loss_in = mi.per_image_loss(probs(x_in), y_in)
    loss_out = mi.per_image_loss(probs(x_out), y_out)
    # The reference: the same model after its first steps (an earlier round's model).
    report = mi.attack_report(mi.validate_histograms(mi.hospital_histograms(loss_in, loss_out)))
    assert report is not None
    assert report["auc"] > 0.95 and report["auc_interval"][0] > 0.85, report["auc"]
    assert report["tpr_at_1pct_fpr"] > 0.5
    assert "right 9" in report["reading"] or "right 100%" in report["reading"]

    # Exchangeable: members and non-members drawn from one distribution of losses.
    same = mi.attack_report(mi.validate_histograms(mi.hospital_histograms(
        rng.lognormal(-1.0, 1.0, 3000), rng.lognormal(-1.0, 1.0, 3000),
        rng.lognormal(-1.0, 1.0, 3000), rng.lognormal(-1.0, 1.0, 3000), 1)))
    assert same is not None and set(same["attacks"]) == {"loss", "loss_ratio"}
    for numbers in same["attacks"].values():
        assert abs(numbers["auc"] - 0.5) < 0.03
        assert numbers["auc_interval"][0] < 0.5 < numbers["auc_interval"][1] + 0.01
        assert numbers["tpr_at_1pct_fpr"] < 0.04
    assert "right 5" in same["reading"] or "right 49%" in same["reading"]


def test_the_calibrated_attack_sees_what_the_loss_alone_misses() -> None:
    """Images differ in difficulty far more than training moves them: the loss alone
    hardly separates members, its ratio to an earlier round's loss does."""
    rng = np.random.default_rng(2)
    difficulty_m, difficulty_n = rng.lognormal(-1, 2, 2000), rng.lognormal(-1, 2, 2000)
    now_m = difficulty_m * rng.lognormal(np.log(0.3), 0.2, 2000)  # members: loss fell 3x
    now_n = difficulty_n * rng.lognormal(np.log(0.6), 0.2, 2000)
    report = mi.attack_report(mi.validate_histograms(mi.hospital_histograms(
        now_m, now_n, difficulty_m, difficulty_n, reference_round=1)))
    assert report is not None and report["attack"] == "loss_ratio"
    assert report["attacks"]["loss"]["auc"] < 0.65 < 0.95 < report["auc"]
    metrics = mi.report_metrics(report)
    assert metrics["membership_auc"] == report["auc"]
    assert {"membership_tpr_at_1pct_fpr", "membership_tpr_at_0p1pct_fpr",
            "membership_loss_auc", "membership_loss_ratio_auc",
            "membership_members", "membership_nonmembers"} <= set(metrics)


@pytest.mark.parametrize("bad, why", [
    ({"format": "x"}, "format"),
    ({"format": mi.FORMAT, "attacks": {}}, "'loss'"),
    ({"format": mi.FORMAT, "attacks": {"loss": {"members": [1, 2], "nonmembers": [1]}}},
     "440 integer counts"),
    ({"format": mi.FORMAT, "attacks": {"loss": {"members": [-1] + [0] * 439,
                                                "nonmembers": [0] * 440}}}, "negative"),
    ({"format": mi.FORMAT, "attacks": {"loss": {"members": [0.5] + [0] * 439,
                                                "nonmembers": [0] * 440}}}, "integer"),
    ({"format": mi.FORMAT, "attacks": {"loss": {"members": [1] + [0] * 439,
                                                "nonmembers": [0] * 440},
                                       "loss_ratio": {"members": [0] * 880,
                                                      "nonmembers": [0] * 880}}}, "same images"),
    ({"format": mi.FORMAT, "attacks": {"loss": {"members": [0] * 440,
                                                "nonmembers": [0] * 440},
                                       "shadow": {}}}, "unknown"),
])
def test_malformed_histograms_are_refused_with_the_reason(bad: dict, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        mi.validate_histograms(bad)


def test_more_images_than_declared_are_refused() -> None:
    h = mi.hospital_histograms(np.ones(30), np.ones(10))
    mi.validate_histograms(h, max_members=30, max_nonmembers=10)
    with pytest.raises(ValueError, match="30 members scored, 20 declared"):
        mi.validate_histograms(h, max_members=20)


def test_the_card_carries_the_audit_and_promote_reads_it_out() -> None:
    from leukofed.card import build_card, card_html, card_markdown, card_summary

    rng = np.random.default_rng(3)
    report = mi.attack_report(mi.validate_histograms(mi.hospital_histograms(
        rng.lognormal(-3, 1, 400), rng.lognormal(-2, 1, 300))), hospitals=3)
    card = build_card({"model_name": "m", "version": "round 2", "membership": report})
    mem = card["membership"]
    assert mem["measured"] and mem["attack"] == "loss" and mem["hospitals"] == 3
    assert (mem["members"], mem["nonmembers"]) == (400, 300)
    assert mem["auc"] == report["auc"] and mem["tpr_at_1pct_fpr"] == report["tpr_at_1pct_fpr"]
    assert mem["tpr_at_1pct_fpr_resolved"] and not mem["tpr_at_0p1pct_fpr_resolved"]
    right = f"right {100 * report['auc']:.0f}% of the time where a coin is right 50%"
    assert right in mem["reading"]
    md = card_markdown(card)
    assert "## Membership inference (privacy audit)" in md and right in md
    assert "too few non-members to resolve" in md  # 300 < 1 / 0.1%
    assert right in card_html(card)
    assert "membership audit (loss): AUC" in card_summary(card) and right in card_summary(card)
    empty = build_card({"model_name": "m", "version": "1"})
    assert empty["membership"]["measured"] is False
    assert "membership audit: not measured" in card_summary(empty)
