"""One bad answer never fails the run (security review, issue 11): malformed numbers, an
inflated example count, a forged or malformed evaluation and an impossible tensor shape are
each rejected for that hospital with the reason logged, and the run completes unchanged by
them. The round loop runs against the fakes of test_round_loop."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import pytest
from test_round_loop import Clock, FakeDispatcher, honest, make_run

from leukofed.validation import UpdateRejected, validate_evaluation
from leukofed.wire import WireFormatError, decode_weights, encode_weights
from services.aggregator.config import RunConfig

PERFECT = [[5, 0, 0, 0], [0, 5, 0, 0], [0, 0, 5, 0], [0, 0, 0, 5]]


class DescribingDispatcher(FakeDispatcher):
    """The fake broker whose hospitals declare the given split sizes."""

    def __init__(self, *args: Any, declared: dict[str, dict[str, int]], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.declared = declared

    def describe(self, hospital: str, config: dict[str, Any]) -> dict[str, Any] | None:
        return {**super().describe(hospital, config), "splits": self.declared[hospital]}


def twisted(change):
    """An honest hospital whose fit (or evaluate) answer is changed by ``change``."""
    base = honest(1.0, 2)

    def answer(task: str, args: list[Any], hospital: str) -> dict[str, Any]:
        out = base(task, args, hospital)
        return change(task, out)
    return answer


def run_with(tmp_path, b_behaviour, declared=None):
    clock = Clock()
    behaviours = {"a": honest(3.0, 2), "b": b_behaviour}
    d = (DescribingDispatcher(clock, behaviours, live={"a", "b"}, declared=declared)
         if declared else FakeDispatcher(clock, behaviours, live={"a", "b"}))
    run = make_run(tmp_path, d, clock, min_fit_clients=1, rounds=1)
    rec = run.execute()
    assert rec["status"] == "completed", rec["reason"]
    weights, _ = run.store.read_checkpoint(rec)
    return rec, weights, [e["message"] for e in rec["events"]]


def on_fit(field: str, value: Any):
    def change(task: str, out: dict[str, Any]) -> dict[str, Any]:
        if task.endswith("fit"):
            out[field] = value
        return out
    return change


def test_a_string_where_a_number_belongs_rejects_that_hospital_only(tmp_path) -> None:
    rec, weights, events = run_with(tmp_path, twisted(on_fit("metrics", {"loss": "high"})))
    assert rec["rounds"][0]["rejected"]["b"].startswith("schema: metrics")
    np.testing.assert_allclose(weights["dense/kernel"], 3.0)  # a's update alone
    assert any("update from b rejected (schema" in m for m in events)


def test_an_inflated_example_count_is_refused(tmp_path) -> None:
    declared = {"a": {"train": 10, "val": 4, "test": 4}, "b": {"train": 10, "val": 4, "test": 4}}
    rec, weights, _ = run_with(tmp_path, twisted(on_fit("num_examples", 10**9)), declared)
    assert rec["rounds"][0]["rejected"]["b"] == "inflated: claims 1000000000 training " \
        "examples, declared 10"
    np.testing.assert_allclose(weights["dense/kernel"], 3.0)  # it did not replace the model


@pytest.mark.parametrize("shape", [[0, 2**64 - 1], [1] * 70, [2**31 + 1], [2**16, 2**16]])
def test_an_impossible_tensor_shape_is_a_wire_error(tmp_path, shape) -> None:
    def change(task: str, out: dict[str, Any]) -> dict[str, Any]:
        if task.endswith("fit"):
            doc = msgpack.unpackb(out["weights"], raw=False)
            doc["tensors"][0].update(shape=shape, data=b"",
                                     sha256="e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934c"
                                            "a495991b7852b855")
            out["weights"] = msgpack.packb(doc, use_bin_type=True)
        return out
    with pytest.raises(WireFormatError, match="beyond"):
        decode_weights(change("fit", {"weights": encode_weights(
            {"k": np.zeros(2, np.float32)})})["weights"])
    rec, weights, _ = run_with(tmp_path, twisted(change))
    assert rec["rounds"][0]["rejected"]["b"].startswith("wire:")
    np.testing.assert_allclose(weights["dense/kernel"], 3.0)


def on_eval(split: dict[str, Any]):
    def change(task: str, out: dict[str, Any]) -> dict[str, Any]:
        if task.endswith("evaluate"):
            out["splits"] = {"test": split}
        return out
    return change


@pytest.mark.parametrize("split, reason", [
    ({"n": 4, "loss": 0.1, "accuracy": 1.0, "confusion_matrix": [[2, 0], [0, 2]]},
     "confusion_matrix must be 4x4"),
    ({"n": 4, "loss": "low", "accuracy": 1.0, "confusion_matrix": PERFECT[:2] + [
        [0, 0, 0, 0], [0, 0, 0, 0]]}, "sums to 10"),
    ({"n": 20, "loss": "low", "accuracy": 1.0, "confusion_matrix": PERFECT}, "loss must be"),
    ({"n": 20, "loss": 0.1, "accuracy": 0.5, "confusion_matrix": PERFECT}, "accuracy 0.5"),
    ({"n": -1}, "n must be"),
])
def test_a_malformed_evaluation_is_left_out(tmp_path, split, reason) -> None:
    rec, _, events = run_with(tmp_path, twisted(on_eval(split)))
    assert any("evaluation from b rejected" in m and reason in m for m in events), events
    # Pooled from a alone: its four test images, one per class.
    assert rec["rounds"][0]["global"]["test_n"] == 4


def test_a_forged_perfect_evaluation_beyond_the_declared_split_is_refused(tmp_path) -> None:
    """A hospital that declared 4 test images claims 10,000 perfectly classified ones: it
    would carry pooled accuracy (and `promote best`) to 1.0."""
    forged = {"n": 10_000, "loss": 0.0, "accuracy": 1.0,
              "confusion_matrix": [[2500 if i == j else 0 for j in range(4)] for i in range(4)]}
    declared = {"a": {"train": 10, "val": 4, "test": 4}, "b": {"train": 10, "val": 4, "test": 4}}
    rec, _, events = run_with(tmp_path, twisted(on_eval(forged)), declared)
    assert any("inflated: test: 10000 images evaluated, 4 declared" in m for m in events)
    assert rec["rounds"][0]["global"]["test_n"] == 4


def test_validate_evaluation_accepts_what_the_client_sends() -> None:
    validate_evaluation({"splits": {"val": {"n": 0}, "test": {
        "n": 20, "loss": 0.3, "accuracy": 1.0, "confusion_matrix": PERFECT,
        "calibration": {}}}}, {"val": 0, "test": 20})
    with pytest.raises(UpdateRejected):
        validate_evaluation({"splits": {"test": {"n": 20, "loss": math.inf, "accuracy": 1.0,
                                                 "confusion_matrix": PERFECT}}})


def test_dp_sampling_is_the_poisson_sampling_the_accountant_assumes(tmp_path) -> None:
    """Central DP at fraction 0.3 over 20 hospitals: each round takes each hospital
    independently with probability 0.3 (the accountant's q), not a fixed-size seeded sample;
    two runs with the same seed sample differently (OS entropy)."""
    from services.aggregator.privacy_step import dp_sampling_rate

    hospitals = [f"h{i:02d}" for i in range(20)]
    samples = []
    for k in range(2):
        clock = Clock()
        d = FakeDispatcher(clock, {h: honest(0.1, 5) for h in hospitals}, live=set(hospitals))
        run = make_run(tmp_path / str(k), d, clock, hospitals=hospitals, rounds=40,
                       fraction=0.3, min_fit_clients=1, seed=7, norm="group",
                       privacy={"mode": "central", "noise_multiplier": 1.0, "clip_norm": 1.0})
        rec = run.execute()
        assert rec["status"] == "completed", rec["reason"]
        assert dp_sampling_rate(RunConfig(**rec["config"])) == 0.3
        per_round = {r["round"]: r["selected"] for r in rec["rounds"]}
        per_round.update({a["round"]: [] for a in rec.get("aborted_rounds", [])})
        assert sorted(per_round) == list(range(1, 41))
        sizes = [len(v) for v in per_round.values()]
        rate = sum(sizes) / (40 * 20)
        assert abs(rate - 0.3) < 0.065, rate  # 4 standard deviations
        assert len(set(sizes)) > 1, "a fixed-size sample is not Poisson"
        samples.append([per_round[r] for r in sorted(per_round)])
    assert samples[0] != samples[1], "the sample must not follow from the run seed"
