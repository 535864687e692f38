"""Many hospitals, against fakes: the running mean equals the weighted average, the round
loop holds no update for the streaming rules, sends at most max_in_flight tasks at once,
fails a hospital whose heartbeat stopped without waiting for the deadline, and refuses a
robust rule whose held updates would exceed the memory limit."""

from __future__ import annotations

import numpy as np
import pytest
from test_round_loop import Clock, FakeDispatcher, FakeOps, honest

from leukofed.liveness import beat, heartbeat_key, read_heartbeats
from leukofed.strategies import RunningSum, weighted_average
from services.aggregator.config import RunConfig
from services.aggregator.deps import RunDeps
from services.aggregator.rounds import FederatedRun
from services.aggregator.run_records import RunStore
from services.aggregator.update_fold import held_updates_problem


def test_running_sum_is_the_weighted_average() -> None:
    rng = np.random.default_rng(0)
    updates = [{"w": rng.normal(size=(3, 4)).astype(np.float32),
                "steps": np.array(7 + i, np.int64)} for i in range(5)]
    counts = [3, 1, 10, 4, 2]
    running = RunningSum()
    for u, n in zip(updates, counts, strict=True):
        running.add(u, n)
    mean = running.mean()
    np.testing.assert_allclose(mean["w"], weighted_average(updates, counts)["w"], rtol=1e-6)
    assert mean["steps"] == 7  # integers from the first update, as weighted_average does
    with pytest.raises(ValueError, match="tensors"):
        running.add({"other": np.zeros(2, np.float32)}, 1)
    with pytest.raises(ValueError, match="nothing to aggregate"):
        RunningSum().mean()


class Window(FakeDispatcher):
    """Records how many tasks were out (sent, not yet read) at the most."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.out = 0
        self.most = 0
        self.beats: dict[str, float | None] = {}

    def submit(self, hospital, task, args, expires):
        self.out += 1
        self.most = max(self.most, self.out)
        return super().submit(hospital, task, args, expires)

    def poll(self, handle):
        done, result, error = super().poll(handle)
        if done:
            self.out -= 1
        return done, result, error

    def heartbeats(self, hospitals):
        return {h: self.beats.get(h) for h in hospitals}


def run_with(tmp_path, dispatcher, clock, hospitals, max_in_flight=64, held_mb=2048.0,
             **config) -> FederatedRun:
    store = RunStore(tmp_path)
    cfg = RunConfig(**{"rounds": 1, "hospitals": hospitals, "round_deadline_s": 100,
                       "max_round_retries": 0, **config})
    record = store.create(cfg.model_dump())
    return FederatedRun(record, RunDeps(store, dispatcher, FakeOps(), None,
                                        poll_interval_s=0.5, clock=clock, sleep=clock.sleep,
                                        max_in_flight=max_in_flight,
                                        max_held_updates_mb=held_mb))


def test_window_streaming_mean_and_no_update_kept(tmp_path) -> None:
    clock = Clock()
    ids = [f"h{i:02d}" for i in range(12)]
    d = Window(clock, {h: honest(i / 10, i + 1) for i, h in enumerate(ids)},
               live=set(ids), slow={h: 1.0 + i % 3 for i, h in enumerate(ids)})
    run = run_with(tmp_path, d, clock, ids, max_in_flight=3, min_fit_clients=12)
    rec = run.execute()
    assert rec["status"] == "completed", rec["reason"]
    assert 1 < d.most <= 3  # fit and evaluate each kept at most 3 tasks out
    weights, _ = run.store.read_checkpoint(rec)
    expected = sum((i + 1) * i / 10 for i in range(12)) / sum(range(1, 13))
    np.testing.assert_allclose(weights["dense/kernel"], np.full((2, 2), expected), rtol=1e-6)
    assert rec["rounds"][0]["participants"] == {h: i + 1 for i, h in enumerate(ids)}
    assert rec["rounds"][0]["hospitals"]["h03"]["num_examples"] == 4.0


def test_fold_keeps_no_tensors(tmp_path) -> None:
    from leukofed.validation import check_tensor_answers
    from services.aggregator.update_fold import UpdateFold

    weights = {"w": np.zeros(3, np.float32)}
    answer = honest(2.0, 5)("fit", [__import__("leukofed.wire").wire.encode_weights(weights),
                                    {}], "a")
    fold = UpdateFold(lambda answers: check_tensor_answers(
        answers, lambda a, h: None, {"a": {"train": 5, "val": 0, "test": 0}},
        lambda update: None))
    kept = fold.take("a", answer)
    assert "weights" not in kept and fold.participants == {"a": 5}
    assert not hasattr(fold.reports["a"], "weights")
    np.testing.assert_allclose(fold.accepted()[0].weights["w"], np.full(3, 2.0))


def test_lost_heartbeat_fails_the_hospital_before_the_deadline(tmp_path) -> None:
    clock = Clock()
    ids = ["a", "b", "c"]
    # c never answers; its worker beat once, then stopped.
    d = Window(clock, {"a": honest(1.0, 1), "b": honest(1.0, 1)}, live=set(ids))
    d.beats = {"a": 1.0, "b": 1.0, "c": 1.0}
    run = run_with(tmp_path, d, clock, ids, min_fit_clients=2)
    original = d.heartbeats

    def beats(hospitals):
        out = original(hospitals)
        d.beats["c"] = None  # gone after the first read
        return out

    d.heartbeats = beats
    started = clock()
    rec = run.execute()
    assert rec["status"] == "completed", rec["reason"]
    first = rec["rounds"][0]
    assert first["failed"]["c"].startswith("worker lost: no heartbeat")
    assert clock() - started < 20  # the deadline is 100 s


def test_never_seen_beating_waits_for_the_deadline(tmp_path) -> None:
    clock = Clock()
    d = Window(clock, {"a": honest(1.0, 1)}, live={"a", "b"})
    run = run_with(tmp_path, d, clock, ["a", "b"], min_fit_clients=1)
    rec = run.execute()
    assert rec["rounds"][0]["failed"]["b"] == "no answer by the deadline"


def test_robust_rule_refused_past_the_memory_limit(tmp_path) -> None:
    clock = Clock()
    ids = [f"h{i}" for i in range(5)]
    d = Window(clock, {h: honest(1.0, 1) for h in ids}, live=set(ids))
    run = run_with(tmp_path, d, clock, ids, held_mb=1e-4, strategy="fedmedian",
                   min_fit_clients=5)
    rec = run.execute()
    assert rec["status"] == "failed"
    assert "fedmedian holds every update" in rec["reason"] and "fedavg" in rec["reason"]
    assert not [s for s in d.sent if s[1].endswith("fit")]  # refused before sending
    assert held_updates_problem("krum", 10, 2**20, 100.0) is None


class FakeRedis:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def pipeline(self, transaction: bool = False):
        return self

    def set(self, key, value, px=None):
        self.values[key] = value

    def execute(self):
        return []

    def mget(self, keys):
        return [self.values.get(k) for k in keys]


def test_heartbeat_keys_live_under_each_hospitals_prefix() -> None:
    redis = FakeRedis()
    beat(redis, ["a", "b"])
    assert set(redis.values) == {heartbeat_key("a"), heartbeat_key("b")}
    assert heartbeat_key("a").startswith("a:")  # within hospital a's ACL key pattern
    beats = read_heartbeats(redis, ["a", "c"])
    assert beats["a"] is not None and beats["c"] is None


class FakeBlobRedis(FakeRedis):
    def __init__(self) -> None:
        super().__init__()
        self.expiries: dict[str, int] = {}
        self.gets = 0

    def exists(self, key):
        return key in self.values

    def pexpire(self, key, ms):
        self.expiries[key] = ms

    def set(self, key, value, px=None):
        self.values[key] = value
        self.expiries[key] = px

    def get(self, key):
        self.gets += 1
        return self.values.get(key)


def test_global_weights_by_reference_stored_once_fetched_once_and_checked() -> None:
    import hashlib
    import time
    from types import SimpleNamespace

    from services.aggregator.dispatch import _share_blob
    from services.client.worker import SharedBlobs

    redis = FakeBlobRedis()
    app = SimpleNamespace(backend=SimpleNamespace(client=redis))
    blob = bytes(range(256)) * 1000
    refs = {_share_blob(app, blob, time.time() + 60) for _ in range(5)}  # five hospitals
    assert refs == {hashlib.sha256(blob).hexdigest()} and len(redis.values) == 1
    assert 60_000 < next(iter(redis.expiries.values())) <= 181_000  # past the deadline

    shared = SharedBlobs(lambda: redis)
    ref = refs.pop()
    assert shared.resolve(b"", ref) == blob and shared.resolve(b"", ref) == blob
    assert redis.gets == 1  # the virtual hospitals of one process fetch it once
    assert shared.resolve(b"inline", None) == b"inline"
    with pytest.raises(LookupError, match="gone from the broker"):
        SharedBlobs(lambda: FakeBlobRedis()).resolve(b"", ref)
    tampered = FakeBlobRedis()
    tampered.values[next(iter(redis.values))] = blob[:-1] + b"x"
    with pytest.raises(ValueError, match="do not match"):
        SharedBlobs(lambda: tampered).resolve(b"", ref)
