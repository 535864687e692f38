"""Issue 26, finding 1: the example-count bound failed open. A hospital whose describe
answer was missing, declined, unsigned or late was never recorded as declared, so a genuinely
signed fit answer claiming 10**9 examples became the global model and a signed "perfect"
evaluation on 10**6 images made pooled test accuracy 0.999997; and a describe signature was
bound to no run, task or nonce, so an old declaration could be replayed.

Now each run asks every hospital afresh, with a nonce, and keeps only a declaration signed
for this run, round and nonce; nothing a hospital without one sends is counted (rejected
``undeclared`` with the reason in the events), and the round goes on with the others. The
hospitals sign with real Ed25519 keys and the aggregator runs its real verifier.
The same attacks through real Celery workers: tests/integration/test_security_declarations.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_round_loop import Clock, FakeDispatcher, make_run

from leukofed.signing import UpdateVerifier, blob_digest, sign_answer
from leukofed.wire import decode_weights, encode_weights

DECLARED = {"train": 16, "val": 4, "test": 4}
HALF = [[1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]  # 2 of 4 right
PERFECT = [[250_000 if i == j else 0 for j in range(4)] for i in range(4)]  # 10**6 right


def signed_hospital(key: Ed25519PrivateKey, delta: float, num_examples: int,
                    confusion: list[list[int]]):
    """Fit: every weight + ``delta``, claiming ``num_examples``; evaluate: ``confusion`` on
    the test split. Each answer genuinely signed by the hospital for its run, round and the
    global weights it got."""
    def answer(task: str, args: list[Any], hospital: str) -> dict[str, Any]:
        blob, cfg = args[0], args[1]
        if task.endswith("evaluate"):
            n = sum(map(sum, confusion))
            out: dict[str, Any] = {"status": "ok", "hospital": hospital, "num_examples": n,
                                   "splits": {"test": {
                                       "n": n, "loss": 0.5, "confusion_matrix": confusion,
                                       "accuracy": sum(confusion[i][i] for i in range(4)) / n}}}
            kind = "evaluation"
        else:
            update = {k: v + np.asarray(delta, v.dtype) for k, v in decode_weights(blob).items()}
            out = {"status": "ok", "hospital": hospital, "weights": encode_weights(update),
                   "num_examples": num_examples, "metrics": {"loss": 1.0},
                   "timings": {"total_s": 1.0}}
            kind = "update"
        out["signature"] = sign_answer(key, kind, hospital, cfg["run_id"], cfg["round"], out,
                                       blob_digest(blob))
        return out
    return answer


def declaration(key: Ed25519PrivateKey | None, hospital: str, run: str, server_round: int,
                nonce: str, splits: dict[str, int] = DECLARED) -> dict[str, Any]:
    """A describe answer for (run, round, nonce), signed with ``key`` (None: unsigned)."""
    out: dict[str, Any] = {"status": "ok", "hospital": hospital, "run_id": run,
                           "round": server_round, "splits": dict(splits), "nonce": nonce}
    if key is not None:
        out["signature"] = sign_answer(key, "describe", hospital, run, server_round, out)
    return out


class Declaring(FakeDispatcher):
    """Hospitals that answer describe with a signed declaration; ``how[h]`` says how a
    hospital answers instead, ``ready_after[h]`` how long it takes (its first scan)."""

    def __init__(self, clock: Clock, behaviours: dict[str, Any], keys: dict[str, Any],
                 how: dict[str, str], ready_after: dict[str, float] | None = None) -> None:
        super().__init__(clock, behaviours, live=set(behaviours))
        self.keys, self.how, self.ready_after = keys, how, ready_after or {}
        self.asked: dict[str, float] = {}

    def describe(self, hospital: str, config: dict[str, Any]) -> dict[str, Any] | None:
        asked = self.asked.setdefault(config["nonce"] + hospital, self.clock())
        if self.clock() < asked + self.ready_after.get(hospital, 0.0):
            return None
        key, run, rnd, nonce = self.keys[hospital], config["run_id"], config["round"], \
            config["nonce"]
        how = self.how.get(hospital, "honest")
        if how == "missing" or (how == "late" and self.clock() < config["deadline"]):
            return None
        if how == "declined":
            return {"status": "declined", "hospital": hospital, "reason": "paused"}
        if how == "unsigned":
            return declaration(None, hospital, run, rnd, nonce)
        if how == "forged":  # a key that is not the hospital's
            return declaration(Ed25519PrivateKey.generate(), hospital, run, rnd, nonce)
        if how == "other_run":  # its genuine declaration of an earlier run, much bigger
            return declaration(key, hospital, "an-earlier-run", rnd, "0" * 32,
                               {"train": 10**9, "val": 10**6, "test": 10**6})
        if how == "other_challenge":  # genuine, this run and round, an earlier challenge
            return declaration(key, hospital, run, rnd, "1" * 32,
                               {"train": 10**9, "val": 10**6, "test": 10**6})
        return declaration(key, hospital, run, rnd, nonce)


def run_with(tmp_path, how: str, ready_after: dict[str, float] | None = None):
    """a: honest, 16 images, +1.0, half right on 4 test images. b: declares ``how`` and
    then sends a genuinely signed update of +5 (within the norm bound) claiming 10**9
    examples, and a signed perfect evaluation of 10**6 images."""
    keys = {h: Ed25519PrivateKey.generate() for h in "ab"}
    behaviours = {"a": signed_hospital(keys["a"], 1.0, 16, HALF),
                  "b": signed_hospital(keys["b"], 5.0, 10**9, PERFECT)}
    clock = Clock()
    d = Declaring(clock, behaviours, keys, {"b": how}, ready_after)
    run = make_run(tmp_path, d, clock, rounds=1, min_fit_clients=1)
    run.deps.verifier = UpdateVerifier({h: k.public_key() for h, k in keys.items()})
    run.deps.describe_deadline_s = 30.0
    rec = run.execute()
    assert rec["status"] == "completed", rec["reason"]
    weights, _ = run.store.read_checkpoint(rec)
    return rec, weights, [e["message"] for e in rec["events"]]


REFUSALS = {
    "missing": "round 1 leukofed.client.describe: b no answer by the deadline",
    "late": "round 1 leukofed.client.describe: b no answer by the deadline",
    "declined": "round 1 leukofed.client.describe: b declined: paused",
    "unsigned": "describe answer of b refused (unsigned: no signature)",
    "forged": "describe answer of b refused (forged: signature does not verify",
    "other_run": "describe answer of b refused (replay: signed for run 'an-earlier-run'",
    "other_challenge": "describe answer of b refused (replay: not an answer to this run's",
}


@pytest.mark.parametrize("how", sorted(REFUSALS))
def test_attack_undeclared_hospital_inflates_count_and_evaluation(tmp_path, how) -> None:
    """b's declaration does not hold (``how``): its signed 10**9-example update and its
    signed perfect evaluation on 10**6 images are rejected as ``undeclared``; the global
    model is a's update alone and the pooled test accuracy a's 0.5. Before: b was counted
    with its 10**9 examples (the global model b's +5) and its 10**6 perfect images."""
    rec, weights, events = run_with(tmp_path, how)
    assert any(REFUSALS[how].replace("leukofed.client.", "") in m for m in events), events
    summary = rec["rounds"][0]
    assert summary["participants"] == {"a": 16}
    assert summary["rejected"]["b"].startswith("undeclared: no verified declaration")
    np.testing.assert_allclose(weights["dense/kernel"], np.full((2, 2), 1.0))
    assert any("evaluation from b rejected (undeclared" in m for m in events), events
    assert summary["global"]["test_accuracy"] == 0.5
    codes = {(e.get("hospital"), e.get("rejected")) for e in rec["events"]}
    assert ("b", "undeclared") in codes


def test_a_late_declaration_is_discarded_and_asked_for_again(tmp_path) -> None:
    """A describe answered after its deadline is not taken when it arrives; the next round
    asks again."""
    rec, _, events = run_with(tmp_path, "late")
    assert any("late describe result from b for round 1 discarded" in m for m in events)


def test_a_slow_first_describe_is_waited_for(tmp_path) -> None:
    """A hospital's first describe scans and hashes every image: answered after 25 s (a
    fit deadline of 10 s), within the describe deadline, it is declared and counted."""
    rec, weights, _ = run_with(tmp_path, "honest", ready_after={"a": 25.0, "b": 25.0})
    assert rec["rounds"][0]["participants"] == {"a": 16}
    assert rec["rounds"][0]["rejected"]["b"].startswith("inflated: claims 1000000000")


def test_a_hospital_that_is_not_live_is_not_waited_for(tmp_path) -> None:
    """A worker that neither beats nor answers a ping is not asked to declare: the round
    does not wait the describe deadline for it (a quorum of two with b dead fails at the
    fit deadline, 10 s, not after 120 s more)."""
    keys = {h: Ed25519PrivateKey.generate() for h in "ab"}
    clock = Clock()
    d = Declaring(clock, {"a": signed_hospital(keys["a"], 1.0, 16, HALF)}, keys, {})
    d.live = {"a"}
    run = make_run(tmp_path, d, clock, rounds=1, min_fit_clients=2)
    started = clock()
    rec = run.execute()
    assert rec["status"] == "failed" and "no answer by the deadline" in rec["reason"]
    assert any("b is not live, not asked to declare" in e["message"] for e in rec["events"])
    assert [h for h, task, _ in d.sent if task.endswith("describe")] == ["a"]
    assert clock() - started < 60
