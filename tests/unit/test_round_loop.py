"""The round loop against fakes: quorum, deadline, late results, rejection, resume, cancel.
A fake clock makes deadlines instant."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from leukofed.transport import TASK_DESCRIBE
from leukofed.wire import decode_weights, encode_weights
from services.aggregator.config import RunConfig
from services.aggregator.deps import RunDeps
from services.aggregator.rounds import FederatedRun
from services.aggregator.run_records import RunStore


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += max(s, 0.01)


def honest(delta: float, n: int):
    def answer(task: str, args: list[Any], hospital: str) -> dict[str, Any]:
        weights = decode_weights(args[0])
        if task.endswith("evaluate"):
            cm = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
            return {"status": "ok", "hospital": hospital, "splits": {
                "test": {"n": 4, "loss": 0.5, "accuracy": 1.0, "confusion_matrix": cm}}}
        update = {k: v + np.float32(delta) for k, v in weights.items()}
        return {"status": "ok", "hospital": hospital, "weights": encode_weights(update),
                "num_examples": n, "bytes": 10, "sha256": "x" * 64,
                "metrics": {"loss": 1.0}, "timings": {"total_s": 1.0},
                "dataset_fingerprint": f"fp-{hospital}"}
    return answer


class FakeDispatcher:
    # What every hospital with a behaviour declares when the run asks (gather.declare):
    # answers are only counted from a hospital with a declaration.
    DECLARED = {"train": 10_000, "val": 10_000, "test": 10_000}

    def __init__(self, clock: Clock, behaviours: dict[str, Any], live: set[str] | None = None,
                 slow: dict[str, float] | None = None) -> None:
        self.clock, self.behaviours, self.live = clock, behaviours, live
        self.slow = slow or {}  # hospital -> seconds before its answer is ready
        self.sent: list[tuple[str, str, dict[str, Any]]] = []
        self.discarded = 0

    def live_hospitals(self) -> set[str] | None:
        return self.live

    def submit(self, hospital: str, task: str, args: list[Any], expires: float) -> Any:
        self.sent.append((hospital, task, args[1]))
        return {"hospital": hospital, "task": task, "args": args, "at": self.clock()}

    def poll(self, handle: Any) -> tuple[bool, dict[str, Any] | None, str | None]:
        h = handle["hospital"]
        behaviour = self.behaviours.get(h)
        if behaviour is not None and handle["task"] == TASK_DESCRIBE:
            declared = self.describe(h, handle["args"][1])
            return declared is not None, declared, None
        if behaviour is None or self.clock() < handle["at"] + self.slow.get(h, 0.0):
            return False, None, None
        return True, behaviour(handle["task"], handle["args"], h), None

    def describe(self, hospital: str, config: dict[str, Any]) -> dict[str, Any] | None:
        """The hospital's declaration, answering the run's challenge (unsigned here); None:
        not ready yet."""
        return {"status": "ok", "hospital": hospital, "splits": dict(self.DECLARED),
                "nonce": config["nonce"]}

    def discard(self, handle: Any) -> None:
        self.discarded += 1


class FakeOps:
    def initial(self, cfg: RunConfig) -> tuple[dict[str, np.ndarray], set[str]]:
        return {"dense/kernel": np.zeros((2, 2), np.float32),
                "bn/moving_mean": np.ones(2, np.float32)}, {"bn/moving_mean"}

    def server_predictions(self, cfg: RunConfig, weights: Any) -> None:
        return None


class FakeTracker:
    def __init__(self) -> None:
        self.registry: dict[tuple[str, int], str] = {}
        self.logged: list[int] = []
        self.on_log = None

    def start(self, record: dict[str, Any], cfg: RunConfig) -> str:
        return record.get("mlflow_run_id") or "mlflow-1"

    def log_round(self, record: dict[str, Any], summary: dict[str, Any]) -> None:
        self.logged.append(summary["round"])
        if self.on_log:
            self.on_log(summary["round"])

    def register(self, record: dict[str, Any], cfg: RunConfig, summary: dict[str, Any],
                 weights: Any) -> str:
        key = (record["id"], summary["round"])
        return self.registry.setdefault(key, str(len(self.registry) + 1))

    def finish(self, record: dict[str, Any]) -> None:
        pass


def make_run(tmp_path, dispatcher, clock, tracker=None, ops=None, **config) -> FederatedRun:
    store = RunStore(tmp_path)
    cfg = RunConfig(**{"rounds": 2, "hospitals": ["a", "b"], "round_deadline_s": 10,
                       "max_round_retries": 0, **config})
    record = store.create(cfg.model_dump())
    return FederatedRun(record, RunDeps(store, dispatcher, ops or FakeOps(), tracker,
                                        poll_interval_s=0.5, clock=clock, sleep=clock.sleep))


def test_fedavg_two_rounds_weighted_and_tracked(tmp_path) -> None:
    clock = Clock()
    tracker = FakeTracker()
    d = FakeDispatcher(clock, {"a": honest(1.0, 1), "b": honest(3.0, 3)}, live={"a", "b"})
    run = make_run(tmp_path, d, clock, tracker, min_fit_clients=2)
    rec = run.execute()
    assert rec["status"] == "completed", rec["reason"]
    weights, _ = run.store.read_checkpoint(rec)
    # (1*1 + 3*3)/4 = 2.5 per round, two rounds; BN statistics averaged the same way.
    np.testing.assert_allclose(weights["dense/kernel"], np.full((2, 2), 5.0))
    np.testing.assert_allclose(weights["bn/moving_mean"], np.full(2, 6.0))
    assert rec["versions"] == {"1": "1", "2": "2"} and tracker.logged == [1, 2]
    assert rec["rounds"][0]["global"]["test_accuracy"] == 1.0
    assert rec["rounds"][0]["participants"] == {"a": 1, "b": 3}
    fit_configs = [c for _, task, c in d.sent if task.endswith("fit")]
    assert {c["round"] for c in fit_configs} == {1, 2} and all(c["deadline"] for c in fit_configs)


def test_dead_hospital_deadline_quorum_and_late_result(tmp_path) -> None:
    clock = Clock()
    d = FakeDispatcher(clock, {"a": honest(1.0, 1), "b": honest(3.0, 3)}, slow={"b": 15.0})
    run = make_run(tmp_path, d, clock, min_fit_clients=1)
    rec = run.execute()
    assert rec["status"] == "completed"
    assert rec["rounds"][0]["participants"] == {"a": 1}
    assert rec["rounds"][0]["failed"]["b"] == "no answer by the deadline"
    assert any("late fit result from b for round 1 discarded" in e["message"]
               for e in rec["events"])


def test_quorum_unreachable_fails_with_reason(tmp_path) -> None:
    clock = Clock()
    d = FakeDispatcher(clock, {"a": honest(1.0, 1)})
    run = make_run(tmp_path, d, clock, min_fit_clients=2, max_round_retries=2)
    rec = run.execute()
    assert rec["status"] == "failed"
    assert "round 1: quorum not reached after 3 attempts" in rec["reason"]
    assert "no answer by the deadline" in rec["reason"]
    assert sum(1 for _, t, _ in d.sent if t.endswith("fit")) == 6


def test_declined_and_bad_updates_are_left_out(tmp_path) -> None:
    clock = Clock()

    def nan(task: str, args: list[Any], hospital: str) -> dict[str, Any]:
        answer = honest(1.0, 5)(task, args, hospital)
        if task.endswith("fit"):
            w = decode_weights(answer["weights"])
            w["dense/kernel"][0, 0] = np.nan
            answer["weights"] = encode_weights(w)
        return answer

    def paused(task: str, args: list[Any], hospital: str) -> dict[str, Any]:
        return {"status": "declined", "hospital": hospital, "reason": "paused"}

    d = FakeDispatcher(clock, {"a": honest(1.0, 1), "b": nan, "c": paused})
    run = make_run(tmp_path, d, clock, hospitals=["a", "b", "c"], rounds=1)
    rec = run.execute()
    assert rec["status"] == "completed"
    r = rec["rounds"][0]
    assert r["participants"] == {"a": 1}
    assert r["rejected"]["b"].startswith("non_finite")
    assert r["failed"]["c"] == "declined: paused"


def test_resume_after_interrupt_continues_and_never_duplicates(tmp_path) -> None:
    def run_all(path, interrupt_after: int | None):
        clock = Clock()
        tracker = FakeTracker()
        d = FakeDispatcher(clock, {"a": honest(1.0, 1), "b": honest(3.0, 3)})
        run = make_run(path, d, clock, tracker, rounds=3, strategy="fedavgm",
                       strategy_params={"momentum": 0.5})
        if interrupt_after:
            tracker.on_log = lambda r: setattr(run, "stop_requested", r == interrupt_after)
        rec = run.execute()
        if interrupt_after:
            assert rec["status"] == "running" and rec["completed_round"] == interrupt_after
            again = FederatedRun(run.store.load(rec["id"]), run.deps)
            rec = again.execute()
        return rec, run.store.read_checkpoint(rec)[0], tracker

    rec, resumed, tracker = run_all(tmp_path / "x", interrupt_after=1)
    assert rec["status"] == "completed"
    assert any("resumed after round 1" in e["message"] for e in rec["events"])
    assert sorted(r for _, r in tracker.registry) == [1, 2, 3]
    _, straight, _ = run_all(tmp_path / "y", interrupt_after=None)
    # Momentum state and RNG came back from the checkpoint: same weights as uninterrupted.
    np.testing.assert_allclose(resumed["dense/kernel"], straight["dense/kernel"])


def test_cancel(tmp_path) -> None:
    clock = Clock()
    d = FakeDispatcher(clock, {"a": honest(1.0, 1)}, slow={"a": 5.0})
    run = make_run(tmp_path, d, clock, hospitals=["a"])
    original = clock.sleep

    def sleep(s: float) -> None:
        run.cancel_requested = True
        original(s)

    run.deps.sleep = sleep
    rec = run.execute()
    assert rec["status"] == "cancelled"


def test_invalid_config_rejected() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        RunConfig(strategy="nope")
    with pytest.raises(ValueError, match="min_fit_clients"):
        RunConfig(hospitals=["a"], min_fit_clients=2)
    with pytest.raises(ValueError, match="does not take"):
        RunConfig(strategy="fedavg", strategy_params={"eta": 1})


def test_hospital_joining_between_rounds_takes_part_next_round(tmp_path) -> None:
    clock = Clock()
    d = FakeDispatcher(clock, {"a": honest(1.0, 1), "b": honest(3.0, 3)}, live={"a"})
    run = make_run(tmp_path, d, clock, hospitals=None, rounds=2)
    tracker = FakeTracker()
    tracker.on_log = lambda r: setattr(d, "live", {"a", "b"})  # b's worker starts
    run.deps.tracker = tracker
    rec = run.execute()
    assert [r["selected"] for r in rec["rounds"]] == [["a"], ["a", "b"]]
    # b's laboratory is not answered yet: nothing shows the model does well on its images
    # (these fake hospitals send no validation split), so it stays on probation
    assert rec["established_hospitals"] == ["a"]
    assert any("b left out of the acquisition profile (on probation" in e["message"]
               for e in rec["events"])


def test_hospitals_live_at_the_start_but_not_sampled_are_not_joiners(tmp_path) -> None:
    # Partial participation: a share of three sampled a round. All three were there when the
    # run began, so all three are established, whichever the first round took.
    clock = Clock()
    d = FakeDispatcher(clock, {h: honest(1.0, 1) for h in "abc"}, live={"a", "b", "c"})
    run = make_run(tmp_path, d, clock, hospitals=None, fraction=0.34, rounds=2)
    rec = run.execute()
    assert rec["status"] == "completed", rec["reason"]
    assert len(rec["rounds"][0]["selected"]) < 3  # one of them was not in round 1
    assert rec["established_hospitals"] == ["a", "b", "c"]
    assert not any("probation" in e["message"] for e in rec["events"])


def calibrating(delta: float, n: int, stats: dict[str, Any] | None = None,
                count: int | None = None):
    """Fits like ``honest``; answers calibrate with the given BatchNorm statistics."""
    fit = honest(delta, n)

    def answer(task: str, args: list[Any], hospital: str) -> dict[str, Any]:
        if not task.endswith("calibrate"):
            return fit(task, args, hospital)
        measured = stats if stats is not None else {"bn/moving_mean": np.full(2, delta,
                                                                               np.float32)}
        return {"status": "ok", "hospital": hospital, "weights": encode_weights(measured),
                "num_examples": count if count is not None else n, "bytes": 10}
    return answer


def test_server_optimizer_rounds_end_with_pooled_batchnorm_calibration(tmp_path) -> None:
    clock = Clock()
    d = FakeDispatcher(clock, {"a": calibrating(1.0, 1), "b": calibrating(3.0, 3)},
                       live={"a", "b"})
    run = make_run(tmp_path, d, clock, min_fit_clients=2, strategy="fedadam")
    rec = run.execute()
    assert rec["status"] == "completed", rec["reason"]
    calibrations = [(h, c) for h, task, c in d.sent if task.endswith("calibrate")]
    assert sorted(h for h, _ in calibrations) == ["a", "a", "b", "b"]  # 2 rounds
    assert all(c["calibration_images"] == 512 and c["deadline"] for _, c in calibrations)
    weights, _ = run.store.read_checkpoint(rec)
    # The hospitals' measured means (1 with 1 image, 3 with 3 images) pooled: 2.5, not the
    # averaged statistics of the fit updates (those were 1 + 2.5 + 2.5 = 6 after two rounds).
    np.testing.assert_allclose(weights["bn/moving_mean"], np.full(2, 2.5))
    assert rec["rounds"][1]["bn_calibration"]["hospitals"] == {"a": 1, "b": 3}
    assert rec["rounds"][1]["bn_calibration"]["pooling"] == "exact"


def test_bad_batchnorm_statistics_are_rejected_and_the_round_goes_on(tmp_path) -> None:
    clock = Clock()
    nan = {"bn/moving_mean": np.full(2, np.nan, np.float32)}
    d = FakeDispatcher(clock, {"a": calibrating(1.0, 1), "b": calibrating(3.0, 3, nan)},
                       live={"a", "b"})
    run = make_run(tmp_path, d, clock, min_fit_clients=2, strategy="fedmedian", rounds=1)
    rec = run.execute()
    assert rec["status"] == "completed", rec["reason"]
    calibration = rec["rounds"][0]["bn_calibration"]
    assert calibration["hospitals"] == {"a": 1} and calibration["pooling"] == "median"
    assert calibration["rejected"]["b"].startswith("non_finite")
    assert any("BatchNorm statistics from b rejected (non_finite" in e["message"]
               for e in rec["events"])
    weights, _ = run.store.read_checkpoint(rec)
    np.testing.assert_allclose(weights["bn/moving_mean"], np.full(2, 1.0))


def test_without_usable_statistics_the_averaged_ones_stay(tmp_path) -> None:
    clock = Clock()
    wrong = {"other/moving_mean": np.ones(2, np.float32)}
    d = FakeDispatcher(clock, {"a": calibrating(1.0, 1, wrong), "b": calibrating(3.0, 3, wrong)},
                       live={"a", "b"})
    run = make_run(tmp_path, d, clock, min_fit_clients=2, strategy="fedavgm", rounds=1)
    rec = run.execute()
    assert rec["status"] == "completed", rec["reason"]
    assert set(rec["rounds"][0]["bn_calibration"]["rejected"]) == {"a", "b"}
    assert any("no usable BatchNorm statistics" in e["message"] for e in rec["events"])
    weights, _ = run.store.read_checkpoint(rec)
    np.testing.assert_allclose(weights["bn/moving_mean"], np.full(2, 1 + 2.5))  # averaged


@pytest.mark.parametrize(("config", "calibrates"), [
    ({"strategy": "fedavg"}, False),
    ({"strategy": "fedprox"}, False),
    ({"strategy": "fedadam"}, True),
    ({"strategy": "krum"}, True),
    ({"strategy": "fedavg", "bn_calibration": "on"}, True),
    ({"strategy": "fedadam", "bn_calibration": "off"}, False),
    ({"strategy": "fedadam", "bn_mode": "local"}, False),
    ({"strategy": "fedadam", "privacy": {"noise_multiplier": 0.0}}, False),
])
def test_when_rounds_calibrate(config: dict[str, Any], calibrates: bool) -> None:
    assert RunConfig(**config).calibrates_batchnorm() is calibrates


@pytest.mark.parametrize("config", [
    {"bn_calibration": "on", "bn_mode": "local"},
    {"bn_calibration": "on", "privacy": {"noise_multiplier": 0.0}},
    {"bn_calibration": "sometimes"},
])
def test_contradictory_calibration_configs_are_refused(config: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RunConfig(**config)


def test_fedavg_sends_no_calibration_task(tmp_path) -> None:
    clock = Clock()
    d = FakeDispatcher(clock, {"a": calibrating(1.0, 1), "b": calibrating(3.0, 3)},
                       live={"a", "b"})
    rec = make_run(tmp_path, d, clock, min_fit_clients=2, rounds=1).execute()
    assert rec["status"] == "completed"
    assert not any(task.endswith("calibrate") for _, task, _ in d.sent)
    assert "bn_calibration" not in rec["rounds"][0]


# --- classifier-head rebalancing ------------------------------------------------------------

HEAD_DIM, HEAD_CLASSES = 3, 4
CLASS_MEANS = np.eye(HEAD_CLASSES, HEAD_DIM) * 4.0  # class 3 sits at the origin


class HeadOps(FakeOps):
    """A model whose only float tensors are the softmax head, biased against class 0."""

    def initial(self, cfg: RunConfig) -> tuple[dict[str, np.ndarray], set[str]]:
        bias = np.zeros(HEAD_CLASSES, np.float32)
        bias[0] = -20.0
        return {"probabilities/kernel": np.zeros((HEAD_DIM, HEAD_CLASSES), np.float32),
                "probabilities/bias": bias}, set()


def head_statistics(counts: list[int], bad: str = ""):
    """Fits without moving the weights; answers calibrate (measure "head") with per-class
    sums of features drawn around CLASS_MEANS, as leukofed.head_rebalance makes them."""
    from leukofed.head_rebalance import class_feature_stats

    fit = honest(0.0, sum(counts))

    def answer(task: str, args: list[Any], hospital: str) -> dict[str, Any]:
        if not task.endswith("calibrate"):
            return fit(task, args, hospital)
        assert args[1]["measure"] == "head"
        rng = np.random.default_rng(len(hospital))
        y = np.repeat(np.arange(HEAD_CLASSES), counts)
        x = CLASS_MEANS[y] + rng.normal(0, 0.5, (len(y), HEAD_DIM))
        arrays = class_feature_stats(np.tile(x, (4, 1)), np.tile(y, 4), HEAD_CLASSES).to_arrays()
        if bad == "shape":
            arrays["outer"] = arrays["outer"][:, :2]
        images = len(y) - (1 if bad == "count" else 0)
        return {"status": "ok", "hospital": hospital, "num_examples": images, "bytes": 10,
                "weights": encode_weights({f"head/{k}": v for k, v in arrays.items()})}
    return answer


def head_run(tmp_path, behaviours: dict[str, Any], **config: Any) -> tuple[Any, FakeDispatcher]:
    clock = Clock()
    d = FakeDispatcher(clock, behaviours, live=set(behaviours))
    run = make_run(tmp_path, d, clock, ops=HeadOps(), min_fit_clients=1, rounds=1,
                   hospitals=sorted(behaviours), **{"head_rebalance": True, **config})
    return run, d


def test_rounds_refit_the_head_from_the_hospitals_feature_sums(tmp_path) -> None:
    # Class 0 lives at one hospital only; the averaged head never predicts it (bias -20).
    run, d = head_run(tmp_path, {"a": head_statistics([30, 0, 40, 0]),
                                 "b": head_statistics([0, 50, 10, 60])})
    rec = run.execute()
    assert rec["status"] == "completed", rec["reason"]
    sent = [c for _, task, c in d.sent if task.endswith("calibrate")]
    assert len(sent) == 2 and all(c["measure"] == "head" for c in sent)
    head = rec["rounds"][0]["head_rebalance"]
    assert head["hospitals"] == ["a", "b"] and head["rejected"] == {}
    assert head["pooled_class_images"] == [30, 50, 50, 60]
    weights, _ = run.store.read_checkpoint(rec)
    scores = CLASS_MEANS @ weights["probabilities/kernel"] + weights["probabilities/bias"]
    assert list(scores.argmax(axis=1)) == [0, 1, 2, 3]  # class 0 is predicted again


@pytest.mark.parametrize("bad, reason", [("shape", "schema"), ("count", "count")])
def test_bad_head_statistics_are_rejected_and_the_round_goes_on(tmp_path, bad: str,
                                                                reason: str) -> None:
    run, _ = head_run(tmp_path, {"a": head_statistics([30, 20, 40, 10]),
                                 "b": head_statistics([0, 50, 10, 60], bad=bad)})
    rec = run.execute()
    assert rec["status"] == "completed", rec["reason"]
    head = rec["rounds"][0]["head_rebalance"]
    assert head["hospitals"] == ["a"] and head["rejected"]["b"].startswith(reason)
    assert any(f"head statistics from b rejected ({reason}" in e["message"]
               for e in rec["events"])


def test_without_usable_head_statistics_the_averaged_head_stays(tmp_path) -> None:
    run, _ = head_run(tmp_path, {"a": head_statistics([30, 20, 40, 10], bad="count")})
    rec = run.execute()
    assert rec["status"] == "completed", rec["reason"]
    assert any("no usable head statistics" in e["message"] for e in rec["events"])
    weights, _ = run.store.read_checkpoint(rec)
    assert weights["probabilities/bias"][0] == -20.0


@pytest.mark.parametrize(("config", "rebalances"), [
    ({}, True),
    ({"strategy": "fedadam"}, True),
    ({"strategy": "fedmedian"}, False),
    ({"bn_mode": "local"}, False),
    ({"privacy": {"noise_multiplier": 0.0}}, False),
])
def test_when_rounds_rebalance_the_head(config: dict[str, Any], rebalances: bool) -> None:
    assert RunConfig(head_rebalance=True, **config).rebalances_head() is rebalances
    assert RunConfig(**config).rebalances_head() is False  # off unless asked for


def test_the_default_run_sends_no_head_statistics_task(tmp_path) -> None:
    run, d = head_run(tmp_path, {"a": head_statistics([30, 0, 40, 0])}, head_rebalance=False)
    rec = run.execute()
    assert rec["status"] == "completed", rec["reason"]
    assert not any(task.endswith("calibrate") for _, task, _ in d.sent)
    assert "head_rebalance" not in rec["rounds"][0]


def test_membership_histograms_are_pooled_into_the_round_and_its_metrics(tmp_path) -> None:
    """Each hospital's evaluate answer carries membership histograms (leukofed.membership);
    the round pools them exactly into the audit and its membership_* metrics, and a hospital
    claiming more members than its declared training split is left out of the audit only,
    and so is one whose update never counted (its training images are not members)."""
    from leukofed.membership import attack_report, hospital_histograms, validate_histograms

    rng = np.random.default_rng(0)
    losses = {"a": (rng.lognormal(-3, 1, 300), rng.lognormal(-1, 1, 100)),
              "b": (rng.lognormal(-3, 1, 50), rng.lognormal(-1, 1, 80))}

    def with_histograms(delta: float, n: int):
        base = honest(delta, n)

        def answer(task: str, args: list[Any], hospital: str) -> dict[str, Any]:
            out = base(task, args, hospital)
            if task.endswith("evaluate"):
                assert args[1]["membership_images"] == 512
                assert args[1]["membership_reference_round"] == 1
                out["membership"] = hospital_histograms(*losses[hospital])
            return out
        return answer

    def rejected(task: str, args: list[Any], hospital: str) -> dict[str, Any]:
        answer = with_histograms(1.0, 5)(task, args, hospital)
        if task.endswith("fit"):  # its update never counts: the model has no members of it
            w = decode_weights(answer["weights"])
            w["dense/kernel"][0, 0] = np.nan
            answer["weights"] = encode_weights(w)
        return answer

    clock = Clock()
    d = FakeDispatcher(clock, {"a": with_histograms(1.0, 1), "b": with_histograms(3.0, 3),
                               "c": with_histograms(1.0, 1), "d": rejected},
                       live={"a", "b", "c", "d"})
    losses["c"] = (rng.lognormal(-3, 1, 20_000), rng.lognormal(-1, 1, 10))  # > declared
    losses["d"] = (rng.lognormal(-1, 1, 100), rng.lognormal(-1, 1, 100))
    run = make_run(tmp_path, d, clock, FakeTracker(), min_fit_clients=2, rounds=1,
                   hospitals=["a", "b", "c", "d"])
    rec = run.execute()
    assert rec["status"] == "completed", rec["reason"]
    summary = rec["rounds"][0]
    audit = summary["membership"]
    expected = attack_report(validate_histograms(hospital_histograms(
        np.concatenate([losses["a"][0], losses["b"][0]]),
        np.concatenate([losses["a"][1], losses["b"][1]]))), hospitals=2)
    assert audit == expected and audit["members"] == 350 and audit["nonmembers"] == 180
    assert summary["global"]["membership_auc"] == audit["auc"] > 0.8
    assert summary["global"]["membership_tpr_at_1pct_fpr"] == audit["tpr_at_1pct_fpr"]
    assert any("c left out of the membership audit" in e["message"] and "declared" in
               e["message"] for e in rec["events"])
    assert any("d left out of the membership audit" in e["message"] and "not trained" in
               e["message"] for e in rec["events"])
