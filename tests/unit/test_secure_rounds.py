"""The round loop under secure aggregation, against fakes that run each hospital's real
secure-aggregation side (services.client.secure) in-process: the aggregator's stages, the
weighted mean from the sum, drop-outs, an aborted round, and what secure aggregation refuses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError
from test_round_loop import Clock, FakeDispatcher, FakeTracker, make_run

from leukofed.protocol import RoundConfig
from leukofed.secagg import bn_moments
from leukofed.signing import UpdateVerifier, sign_secagg
from leukofed.transport import TASK_SECAGG_KEYS, TASK_SECAGG_REVEAL, TASK_SECAGG_SHARES
from leukofed.wire import decode_weights
from services.aggregator.config import RunConfig
from services.client.secure import SecureSessions, update_to_sum


def secure_hospital(delta: float, n: int, die_at: str | None = None):
    """A hospital adding ``delta`` to every weight, with ``n`` examples, that stops answering
    at stage ``die_at`` ("keys", "shares", "fit", "reveal"). One neighbour is enough for it,
    so that the aggregator's side runs with two hospitals too (a hospital's own minimum
    degree, 2 by default, is tested in test_secagg.py)."""
    sessions: dict[str, SecureSessions] = {}

    def answer(task: str, args: list[Any], hospital: str) -> dict[str, Any] | None:
        s = sessions.setdefault(hospital, SecureSessions(hospital, min_neighbours=1))
        cfg = RoundConfig.decode(args[1])
        stage = {TASK_SECAGG_KEYS: "keys", TASK_SECAGG_SHARES: "shares",
                 TASK_SECAGG_REVEAL: "reveal"}.get(task, task.rsplit(".", 1)[-1])
        if stage == die_at:
            return {"status": "error", "hospital": hospital, "reason": "worker died"}
        if stage == "keys":
            return s.keys(cfg, n)
        if stage == "shares":
            return s.shares(cfg)
        if stage == "reveal":
            return s.reveal(cfg)
        weights = decode_weights(args[0])
        if stage == "evaluate":
            cm = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
            return {"status": "ok", "hospital": hospital, "splits": {
                "test": {"n": 4, "loss": 0.5, "accuracy": 1.0, "confusion_matrix": cm}}}
        assert cfg.secure is not None, f"plain {stage} under secure mode"
        if stage == "calibrate":  # measured statistics: the global ones plus delta
            stats = {k: v + delta for k, v in weights.items()}
            out = s.masked(cfg, weights, bn_moments(stats), float(n), {"count": 1.0})
            return out
        local = {k: v + delta for k, v in weights.items()}
        # The hospital's own code turns its update into what it adds to the sum.
        delta_t, weight, extras = update_to_sum(cfg.secure, weights, local, n)
        out = s.masked(cfg, weights, delta_t, weight, extras)
        out.update(metrics={"loss": 1.0}, timings={"total_s": 1.0})
        return out
    return answer


def run_secure(tmp_path, behaviours, **config):
    clock = Clock()
    tracker = FakeTracker()
    d = FakeDispatcher(clock, behaviours, live=set(behaviours))
    run = make_run(tmp_path, d, clock, tracker, **{
        "hospitals": sorted(behaviours), "min_fit_clients": 2,
        "secure_aggregation": "on", **config})
    return run, run.execute(), d, tracker


def test_secure_round_gives_the_weighted_mean(tmp_path) -> None:
    run, rec, d, tracker = run_secure(tmp_path, {
        "a": secure_hospital(0.1, 10), "b": secure_hospital(0.3, 30),
        "c": secure_hospital(-0.2, 20), "d": secure_hospital(0.05, 40)}, rounds=1)
    assert rec["status"] == "completed", rec["reason"]
    weights, _ = run.store.read_checkpoint(rec)
    expected = (0.1 * 10 + 0.3 * 30 - 0.2 * 20 + 0.05 * 40) / 100
    np.testing.assert_allclose(weights["dense/kernel"], np.full((2, 2), expected), atol=1e-5)
    # BatchNorm statistics move by their own scale: a wider range, averaged the same way.
    np.testing.assert_allclose(weights["bn/moving_mean"], np.full(2, 1 + expected), atol=1e-5)
    summary = rec["rounds"][0]
    assert summary["secure_aggregation"]["answered"]["reveal"] == ["a", "b", "c", "d"]
    assert summary["secure_aggregation"]["total_weight"] == pytest.approx(100, abs=1e-3)
    # Nothing the fit task sent back carried a plain weight tensor.
    fits = [args for h, task, args in d.sent if task.endswith(".fit")]
    assert fits and all(a["secure"]["received"] for a in fits)
    assert tracker.registry, "the version is registered"


@pytest.mark.parametrize("die_at", ["fit", "reveal"])
def test_a_hospital_dropping_out_is_survived(tmp_path, die_at) -> None:
    run, rec, _, _ = run_secure(tmp_path, {
        "a": secure_hospital(0.1, 10), "b": secure_hospital(0.3, 30),
        "c": secure_hospital(-0.2, 20, die_at=die_at), "d": secure_hospital(0.05, 40)},
        rounds=1)
    assert rec["status"] == "completed", rec["reason"]
    weights, _ = run.store.read_checkpoint(rec)
    # c dropped before its vector (fit): its masks are rebuilt from shares and it is not in
    # the mean; c sent its vector and then died (reveal): its update counts.
    if die_at == "fit":
        expected = (0.1 * 10 + 0.3 * 30 + 0.05 * 40) / 80
    else:
        expected = (0.1 * 10 + 0.3 * 30 - 0.2 * 20 + 0.05 * 40) / 100
    np.testing.assert_allclose(weights["dense/kernel"], np.full((2, 2), expected), atol=1e-5)


def test_each_hospital_clips_to_the_update_range_before_masking(tmp_path) -> None:
    run, rec, _, _ = run_secure(tmp_path, {
        "a": secure_hospital(5.0, 10), "b": secure_hospital(0.5, 10)}, rounds=1,
        secure_aggregation={"update_range": 1.0})
    weights, _ = run.store.read_checkpoint(rec)
    np.testing.assert_allclose(weights["dense/kernel"], np.full((2, 2), 0.75), atol=1e-5)
    assert rec["rounds"][0]["secure_aggregation"]["clipped_coordinates"] == {"a": 4, "b": 0}


class LateFit(FakeDispatcher):
    """Every answer at once, except the fit answers of ``late`` hospitals: ready that many
    seconds after the task was sent (the hospital trained and masked, but slowly)."""

    def __init__(self, clock: Clock, behaviours: dict[str, Any], late: dict[str, float]) -> None:
        super().__init__(clock, behaviours, live=set(behaviours))
        self.late = late

    def poll(self, handle: Any) -> tuple[bool, dict[str, Any] | None, str | None]:
        h = handle["hospital"]
        if handle["task"].endswith(".fit") and self.clock() < handle["at"] + self.late.get(h, 0):
            return False, None, None
        return super().poll(handle)


def test_a_vector_after_the_fit_deadline_is_not_in_the_mean(tmp_path) -> None:
    """Issue 10: a hospital that trains and masks its update but answers after the round
    deadline is dropped after sharing. The sum, its total weight and so the mean are over
    the vectors that arrived (the summary's answered["masked"]), not over every hospital
    that trained: the plain mean of all five is off by about one update / 5."""
    deltas = {"a": (0.1, 10), "b": (0.3, 30), "c": (-0.2, 20), "d": (0.05, 40), "e": (0.4, 20)}
    clock, tracker = Clock(), FakeTracker()
    d = LateFit(clock, {h: secure_hospital(*dn) for h, dn in deltas.items()},
                late={"e": 30.0})  # the round deadline is 10 s
    run = make_run(tmp_path, d, clock, tracker, hospitals=sorted(deltas), min_fit_clients=2,
                   secure_aggregation="on", rounds=1)
    rec = run.execute()
    assert rec["status"] == "completed", rec["reason"]
    sa = rec["rounds"][0]["secure_aggregation"]
    assert sa["answered"]["masked"] == ["a", "b", "c", "d"]
    assert sa["dropped_after_shares"] == ["e"]
    assert any(e["message"] == "round 1 fit: e no answer by the deadline" for e in rec["events"])

    def mean(hospitals: str) -> float:
        return sum(deltas[h][0] * deltas[h][1] for h in hospitals) / sum(
            deltas[h][1] for h in hospitals)

    weights, _ = run.store.read_checkpoint(rec)
    summed = sum(deltas[h][1] for h in "abcd")
    # Quantisation: each summed vector is off by less than one step W * r / (2**23 - 1) (W:
    # the caps of every hospital that shared, e's too; r = update_range = 1), the mean by
    # at most 4 steps / the summed weight.
    bound = 4 * sa["total_weight_bound"] / ((2**23 - 1) * summed)
    np.testing.assert_allclose(weights["dense/kernel"], np.full((2, 2), mean("abcd")),
                               rtol=0, atol=bound)
    assert abs(mean("abcde") - mean("abcd")) > 0.03  # what the integration test compared


def test_too_few_survivors_abort_the_round_and_the_run_goes_on(tmp_path) -> None:
    dying = {"a": secure_hospital(1.0, 10), "b": secure_hospital(3.0, 30, die_at="fit"),
             "c": secure_hospital(2.0, 20, die_at="fit")}
    run, rec, _, tracker = run_secure(tmp_path, dying, rounds=2)
    assert rec["status"] == "completed", rec["reason"]
    assert [a["round"] for a in rec["aborted_rounds"]] == [1, 2]
    assert "1 hospitals sent a masked vector" in rec["aborted_rounds"][0]["reason"]
    assert not tracker.registry, "no model is registered for an aborted round"
    weights, _ = run.store.read_checkpoint(rec)
    np.testing.assert_array_equal(weights["dense/kernel"], np.zeros((2, 2)))


def test_what_secure_aggregation_rules_out_is_refused_with_the_reason() -> None:
    base = {"hospitals": ["a", "b"], "min_fit_clients": 2, "secure_aggregation": "on"}
    with pytest.raises(ValidationError, match="needs every hospital's update"):
        RunConfig(**base, strategy="fedmedian")
    with pytest.raises(ValidationError, match="fp16 does not apply"):
        RunConfig(**base, fp16=True)
    with pytest.raises(ValidationError, match="min_fit_clients >= 2"):
        RunConfig(**{**base, "min_fit_clients": 1})
    with pytest.raises(ValidationError, match="'on', 'off'"):
        RunConfig(**{**base, "secure_aggregation": "maybe"})
    assert RunConfig(**{**base, "secure_aggregation": "off"}).secure_aggregation is None
    cfg = RunConfig(**{**base, "secure_aggregation": {"bits": 32, "neighbours": 4}})
    assert cfg.secure_aggregation is not None and cfg.secure_aggregation.bits == 32


def test_the_version_says_which_protocol_produced_it(tmp_path) -> None:
    from services.aggregator.tracking import _aggregation_tag, card_info

    run, rec, _, _ = run_secure(tmp_path, {
        "a": secure_hospital(0.1, 10), "b": secure_hospital(0.2, 10),
        "c": secure_hospital(0.3, 10)}, rounds=1)
    summary = rec["rounds"][0]
    cfg = RunConfig(**rec["config"])
    assert _aggregation_tag(summary["secure_aggregation"]).startswith("secagg (24-bit")
    assert card_info(cfg, rec, summary, "m")["federation"]["secure_aggregation"] is True
    assert _aggregation_tag(None).startswith("plain")
    assert any("secure aggregation on" in e["message"] for e in rec["events"])


def test_batchnorm_calibration_is_a_secure_sum_pooled_exactly(tmp_path) -> None:
    """FedAvgM calibrates BatchNorm after its server step: under secure aggregation the
    statistics are summed as moments, and pooling stays exact (means weighted by counts)."""
    run, rec, d, _ = run_secure(tmp_path, {
        "a": secure_hospital(0.1, 10), "b": secure_hospital(0.3, 30)}, rounds=1,
        strategy="fedavgm", strategy_params={"server_lr": 1.0, "momentum": 0.0})
    assert rec["status"] == "completed", rec["reason"]
    weights, _ = run.store.read_checkpoint(rec)
    summary = rec["rounds"][0]["bn_calibration"]
    assert summary["pooling"] == "secure" and summary["hospitals"] == {"a": 10, "b": 30}
    # The new global moving mean is 1 + 0.25 (the fit); measured at +0.1 and +0.3 of it.
    np.testing.assert_allclose(weights["bn/moving_mean"], np.full(2, 1.25 + 0.25), atol=1e-4)
    assert any(task.endswith("calibrate") and args["secure"] for _, task, args in d.sent)


def test_central_privacy_noises_the_unmasked_sum_of_clipped_updates(tmp_path) -> None:
    run, rec, _, _ = run_secure(tmp_path, {
        "a": secure_hospital(0.1, 10), "b": secure_hospital(0.3, 30)}, rounds=1,
        norm="group", privacy={"mode": "central", "noise_multiplier": 0.0, "clip_norm": 0.2})
    assert rec["status"] == "completed", rec["reason"]
    weights, _ = run.store.read_checkpoint(rec)
    # Six coordinates each: a's delta norm 0.245 clipped to 0.2, b's 0.735 too; uniform
    # weights over the two selected hospitals (DP-FedAvg), no noise at multiplier 0.
    per = 0.2 / np.sqrt(6)
    np.testing.assert_allclose(weights["dense/kernel"], np.full((2, 2), per), atol=1e-5)
    privacy = rec["rounds"][0]["privacy"]
    assert privacy["clipped_fraction"] == 1.0 and privacy["clip_norm"] == 0.2


def test_each_hospital_bounds_its_update_norm_before_masking(tmp_path) -> None:
    """The per-update norm check needs the update; under secure aggregation each hospital
    clips its own update to ``update_clip_norm`` instead."""
    run, rec, d, _ = run_secure(tmp_path, {
        "a": secure_hospital(0.9, 10), "b": secure_hospital(0.1, 10)}, rounds=1,
        secure_aggregation={"update_clip_norm": 0.6})
    weights, _ = run.store.read_checkpoint(rec)
    # Six coordinates: a's norm 0.9 * sqrt(6) = 2.2 is clipped to 0.6, b's 0.245 is not.
    expected = (0.6 / np.sqrt(6) + 0.1) / 2
    np.testing.assert_allclose(weights["dense/kernel"], np.full((2, 2), expected), atol=1e-5)
    fits = [args for _, task, args in d.sent if task.endswith(".fit")]
    assert all(a["secure"]["update_clip_norm"] == 0.6 for a in fits)


# ---- issue 26, finding 5: one malformed reveal answer may not end the run

class SecureAnswersVerifier(UpdateVerifier):
    """The aggregator's real verifier for every secure-aggregation message (keys, shares,
    masked vector, reveal); the fakes' plain evaluation answers are not signed here."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


def signing_hospital(delta: float, n: int, key: Ed25519PrivateKey,
                     tamper: Callable[[dict[str, Any]], Any] | None = None,
                     sign_tampered: bool = True):
    """A hospital that signs every secure-aggregation message with ``key``. ``tamper``
    replaces its reveal's ``reveals`` (from the genuine ones); signed again with its own key
    unless ``sign_tampered`` is off (then the genuine signature rides along)."""
    sessions: dict[str, SecureSessions] = {}
    honest = secure_hospital(delta, n)

    def answer(task: str, args: list[Any], hospital: str) -> dict[str, Any] | None:
        s = sessions.setdefault(hospital, SecureSessions(hospital, signing_key=key))
        cfg = RoundConfig.decode(args[1])
        if task == TASK_SECAGG_KEYS:
            return s.keys(cfg, n)
        if task == TASK_SECAGG_SHARES:
            return s.shares(cfg)
        if task == TASK_SECAGG_REVEAL:
            out = s.reveal(cfg)
            if tamper is not None:
                out["reveals"] = tamper(out["reveals"])
                if sign_tampered:
                    out["signature"] = sign_secagg(key, hospital, cfg.run_id, cfg.round,
                                                   "reveal", {"purpose": out["purpose"],
                                                              "reveals": out["reveals"]})
            return out
        if task.endswith(".fit"):
            weights = decode_weights(args[0])
            local = {k: v + delta for k, v in weights.items()}
            delta_t, weight, extras = update_to_sum(cfg.secure, weights, local, n)
            # As the worker: the report beside the vector first, then signed whole.
            out = s.masked(cfg, weights, delta_t, weight, extras, sign=False)
            out.update(metrics={"loss": 1.0}, timings={"total_s": 1.0})
            return s.sign_masked(cfg, out)
        return honest(task, args, hospital)
    return answer


def _superscript_two(reveals: dict[str, list[str]]) -> dict[str, list[str]]:
    # "²".isdigit() is True, int("²") raises ValueError: the old check let it through
    return {peer: [kind, "²", share] for peer, (kind, _, share) in reveals.items()}


# Each of these failed the whole run, or was taken into the sum, before the fix.
MALFORMED_REVEALS = {
    "list": lambda reveals: [[peer, *entry] for peer, entry in reveals.items()],
    "string": lambda reveals: "everything",
    "superscript_x": _superscript_two,
    # a share "at x = 0" is a claim of the secret itself: it would steer the reconstruction
    "zero_x": lambda reveals: {p: [k, "0", s] for p, (k, x, s) in reveals.items()},
    # shares of a hospital it is not a neighbour of, so holds no share of
    "stranger": lambda reveals: {**reveals, "zz": ["b", "1", "ff"]},
}
# Refused before the fix too (but by a check that could raise past it): still contained.
OTHER_MALFORMED_REVEALS = {
    "short_entry": lambda reveals: {peer: entry[:2] for peer, entry in reveals.items()},
    "int_x": lambda reveals: {p: [k, int(x), s] for p, (k, x, s) in reveals.items()},
    "not_hex": lambda reveals: {p: [k, x, "zz" + s] for p, (k, x, s) in reveals.items()},
}


def _run_with_malformed_reveal(tmp_path, tamper, sign_tampered: bool = True):
    keys = {h: Ed25519PrivateKey.generate() for h in "abcd"}
    deltas = {"a": (0.1, 10), "b": (0.3, 30), "c": (-0.2, 20), "d": (0.05, 40)}
    behaviours = {h: signing_hospital(*deltas[h], keys[h],
                                      tamper if h == "c" else None, sign_tampered)
                  for h in deltas}
    run, rec, tracker = run_signed(tmp_path, behaviours, keys)
    return run, rec, tracker, deltas


def run_signed(tmp_path, behaviours: dict[str, Any], keys: dict[str, Ed25519PrivateKey],
               rounds: int = 2) -> tuple[Any, dict[str, Any], FakeTracker]:
    """A secure run of ``behaviours`` in which the aggregator checks every secure-aggregation
    message against the public halves of ``keys``: (run, its record, the tracker)."""
    clock, tracker = Clock(), FakeTracker()
    d = FakeDispatcher(clock, behaviours, live=set(behaviours))
    run = make_run(tmp_path, d, clock, tracker, hospitals=sorted(behaviours),
                   min_fit_clients=2, secure_aggregation="on", rounds=rounds)
    run.deps.verifier = SecureAnswersVerifier({h: k.public_key() for h, k in keys.items()})
    return run, run.execute(), tracker


@pytest.mark.parametrize("how", sorted(MALFORMED_REVEALS))
def test_attack_malformed_reveal_is_contained_to_its_hospital(tmp_path, how) -> None:
    """Hospital c answers the reveal stage with a genuinely signed but malformed message
    (was: AttributeError on a list, ValueError on x="²" in unmask_sum; run "failed:
    internal error"). c's reveal is left out with the reason in the events; both rounds
    complete and are registered. c's masked vector was already in the sum and stays (its
    self-mask is rebuilt from the others' shares; taking it out would need both of its
    secrets), so the mean is over all four."""
    _check_contained(tmp_path, MALFORMED_REVEALS[how])


@pytest.mark.parametrize("how", sorted(OTHER_MALFORMED_REVEALS))
def test_other_malformed_reveals_are_contained_too(tmp_path, how) -> None:
    _check_contained(tmp_path, OTHER_MALFORMED_REVEALS[how])


def _check_contained(tmp_path, tamper) -> None:
    run, rec, tracker, deltas = _run_with_malformed_reveal(tmp_path, tamper)
    assert rec["status"] == "completed", rec["reason"]
    assert len(rec["rounds"]) == 2 and not rec.get("aborted_rounds")
    assert len(tracker.registry) == 2, "both rounds' versions are registered"
    for summary in rec["rounds"]:
        assert summary["secure_aggregation"]["answered"]["reveal"] == ["a", "b", "d"]
    rejected = [e for e in rec["events"] if "reveal: c rejected (malformed reveal answer" in
                e["message"]]
    assert len(rejected) == 2 and all(e.get("hospital") == "c" for e in rejected), [
        e["message"] for e in rec["events"]]
    weights, _ = run.store.read_checkpoint(rec)
    mean = sum(dv * n for dv, n in deltas.values()) / sum(n for _, n in deltas.values())
    np.testing.assert_allclose(weights["dense/kernel"], np.full((2, 2), 2 * mean), atol=1e-4)


@pytest.mark.parametrize("how", ["list", "string"])
def test_attack_malformed_reveal_unsigned_is_not_interpreted(tmp_path, how) -> None:
    """The same malformed reveals without a valid signature over them (the genuine
    signature of c's honest reveal rides along): refused for the signature, before any of
    it is read (was: read first, so the run failed before the signature was checked)."""
    _, rec, tracker, _ = _run_with_malformed_reveal(tmp_path, MALFORMED_REVEALS[how],
                                                    sign_tampered=False)
    assert rec["status"] == "completed", rec["reason"]
    assert len(tracker.registry) == 2
    rejected = [e["message"] for e in rec["events"] if "reveal: c rejected" in e["message"]]
    assert len(rejected) == 2 and all("(signature forged" in m for m in rejected), rejected
