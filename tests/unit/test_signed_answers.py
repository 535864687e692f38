"""Issue 26, finding 7 (the rest of it): "everything a hospital sends is covered by its
signature". The fit answer was signed whole first (test_signed_side_data.py); calibration,
head-statistics, evaluation and describe answers still signed only their payload (the
weights and count, the splits, the declaration), so their other fields (seconds, byte
count, digest, status, hospital, run id, round, anything added) could be rewritten on the
broker, and a secure-aggregation keys, shares or reveal answer could carry fields outside
its signed body. Now each plain answer is signed over every field it carries
(leukofed.signing.answer_body), and a secure stage's answer may carry nothing beside its
signed body but the fields the signature's claims bind, with exactly those values
(services/aggregator/secure.py, SecureGather._bound).

Each attack below changes one such field of a genuinely signed answer on its way (real
Ed25519 keys, the aggregator's real verifier) and passes only because the aggregator
refuses that answer: the hospital is named with the reason in the events and the round
goes on with the others. On the commit before this one each tampered answer was taken.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_client_service import CFG, global_blob  # noqa: F401 - a fixture
from test_declarations import HALF, Declaring
from test_round_loop import Clock, HeadOps, calibrating, head_statistics, make_run
from test_secure_rounds import run_signed, signing_hospital

from leukofed.signing import (
    NonceCache,
    SignatureRejected,
    UpdateVerifier,
    blob_digest,
    generate_keypair,
    load_public_key,
    sign_answer,
)
from leukofed.transport import TASK_SECAGG_KEYS, TASK_SECAGG_REVEAL, TASK_SECAGG_SHARES
from leukofed.wire import decode_weights, encode_weights
from services.client.hospital import HospitalClient
from services.client.settings import ClientSettings

Answer = dict[str, Any]
Tamper = Callable[[Answer], None]
Behaviour = Callable[[str, list[Any], str], Answer]


def _set(field: str, value: Any) -> Tamper:
    def tamper(answer: Answer) -> None:
        answer[field] = value
    return tamper


# Fields outside the payload that each answer kind carries, rewritten after signing (each
# was outside the signature before), and one added on the broker.
COMMON: dict[str, Tamper] = {
    "hospital": _set("hospital", "mallory"),
    "run_id": _set("run_id", "another-run"),
    "round": _set("round", 7),
    "added_field": _set("note", "added on the broker"),
}
EVALUATION_TAMPERS = {**COMMON, "seconds": _set("seconds", 0.0)}
CALIBRATION_TAMPERS = {**COMMON, "seconds": _set("seconds", 0.0), "bytes": _set("bytes", 1),
                       "sha256": _set("sha256", "0" * 64)}
DESCRIBE_TAMPERS = {**COMMON, "dropped_round": lambda a: a.pop("round")}


def _kind(task: str, config: Answer) -> str:
    short = task.rsplit(".", 1)[-1]
    if short == "calibrate":
        return "head statistics" if config.get("measure") == "head" else "calibration"
    return {"fit": "update", "evaluate": "evaluation"}[short]


def signed(key: Ed25519PrivateKey, inner: Behaviour, tamper: Tamper | None = None,
           on: str = "") -> Behaviour:
    """``inner``'s answers completed as the worker sends them (run id, round, timing, byte
    count), signed with ``key`` for their kind, run, round and global weights as the worker
    signs them (the last step), then changed by ``tamper`` on the way when the task is
    ``on`` (someone with broker access)."""
    def answer(task: str, args: list[Any], hospital: str) -> Answer:
        blob, config = args[0], args[1]
        out = {**inner(task, args, hospital), "run_id": config["run_id"],
               "round": config["round"]}
        short = task.rsplit(".", 1)[-1]
        if short == "evaluate":
            out.update(num_examples=out["splits"]["test"]["n"], seconds=0.5)
        elif short == "calibrate":
            out.update(bytes=len(out["weights"]), sha256=blob_digest(out["weights"]),
                       seconds=0.2)
        out["signature"] = sign_answer(key, _kind(task, config), hospital, config["run_id"],
                                       config["round"], out, blob_digest(blob))
        if tamper is not None and short == on:
            tamper(out)
        return out
    return answer


def evaluating(delta: float, n: int, confusion: list[list[int]]) -> Behaviour:
    """Fit: every weight + ``delta`` with ``n`` examples; evaluate: ``confusion`` on the
    test split."""
    def answer(task: str, args: list[Any], hospital: str) -> Answer:
        if task.endswith("evaluate"):
            total = sum(map(sum, confusion))
            return {"status": "ok", "hospital": hospital, "splits": {"test": {
                "n": total, "loss": 0.5, "confusion_matrix": confusion,
                "accuracy": sum(confusion[i][i] for i in range(4)) / total}}}
        update = {k: v + np.asarray(delta, v.dtype) for k, v in decode_weights(args[0]).items()}
        return {"status": "ok", "hospital": hospital, "weights": encode_weights(update),
                "num_examples": n, "metrics": {"loss": 1.0}, "timings": {"total_s": 1.0}}
    return answer


PERFECT_4 = [[1 if i == j else 0 for j in range(4)] for i in range(4)]


class TamperedDeclaring(Declaring):
    """Signed declarations (real keys); b's is changed by ``tamper`` after it signed it."""

    def __init__(self, *args: Any, tamper: Tamper | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tamper = tamper

    def describe(self, hospital: str, config: Answer) -> Answer | None:
        out = super().describe(hospital, config)
        if out is not None and hospital == "b" and self.tamper is not None:
            self.tamper(out)
        return out


def run_plain(tmp_path, behaviours: dict[str, Behaviour], keys: dict[str, Ed25519PrivateKey],
              describe_tamper: Tamper | None = None, ops: Any = None, **config: Any
              ) -> tuple[Answer, list[str]]:
    """One round of ``behaviours``, each declared with a signed describe (16 training, 4
    val, 4 test images), the aggregator checking every signature with its real verifier."""
    clock = Clock()
    d = TamperedDeclaring(clock, behaviours, keys, {}, tamper=describe_tamper)
    run = make_run(tmp_path, d, clock, ops=ops, rounds=1, min_fit_clients=1,
                   hospitals=sorted(behaviours), **config)
    run.deps.verifier = UpdateVerifier({h: k.public_key() for h, k in keys.items()})
    rec = run.execute()
    assert rec["status"] == "completed", rec["reason"]
    return rec["rounds"][0], [e["message"] for e in rec["events"]]


def _keys() -> dict[str, Ed25519PrivateKey]:
    return {h: Ed25519PrivateKey.generate() for h in "ab"}


# ---------------------------------------------------------------- evaluation


def run_evaluation(tmp_path, tamper: Tamper | None) -> tuple[Answer, list[str]]:
    """a: half right on 4 test images; b: all 4 right, its evaluation then ``tamper``ed."""
    keys = _keys()
    return run_plain(tmp_path, {
        "a": signed(keys["a"], evaluating(1.0, 16, HALF)),
        "b": signed(keys["b"], evaluating(1.0, 16, PERFECT_4), tamper, on="evaluate")}, keys)


def test_an_untouched_signed_evaluation_is_pooled(tmp_path) -> None:
    """The control: both evaluations count (pooled test accuracy (2 + 4) / 8)."""
    rnd, _ = run_evaluation(tmp_path, None)
    assert rnd["global"]["test_accuracy"] == 0.75


@pytest.mark.parametrize("field", sorted(EVALUATION_TAMPERS))
def test_attack_evaluation_field_outside_its_payload_changed_after_signing(
        tmp_path, field: str) -> None:
    """b's signed evaluation with ``field`` rewritten (or added) on the broker: refused
    ``forged``, named in the events, left out of the pooled accuracy (a's 0.5); before,
    the signature covered only its splits and count, and the answer was pooled."""
    rnd, events = run_evaluation(tmp_path, EVALUATION_TAMPERS[field])
    assert any("evaluation from b rejected (forged: payload does not match the signed "
               "digest)" in m for m in events), events
    assert rnd["global"]["test_accuracy"] == 0.5
    assert rnd["participants"] == {"a": 16, "b": 16}  # its fit, untouched, still counts


# ---------------------------------------------------------------- BatchNorm calibration


def run_calibration(tmp_path, tamper: Tamper | None) -> Answer:
    keys = _keys()
    rnd, events = run_plain(tmp_path, {
        "a": signed(keys["a"], calibrating(1.0, 1)),
        "b": signed(keys["b"], calibrating(3.0, 3), tamper, on="calibrate")}, keys,
        strategy="fedadam")
    rnd["events"] = events
    return rnd


def test_untouched_signed_batchnorm_statistics_are_pooled(tmp_path) -> None:
    rnd = run_calibration(tmp_path, None)
    assert rnd["bn_calibration"]["hospitals"] == {"a": 1, "b": 3}


@pytest.mark.parametrize("field", sorted(CALIBRATION_TAMPERS))
def test_attack_calibration_field_outside_its_payload_changed_after_signing(
        tmp_path, field: str) -> None:
    """b's signed BatchNorm statistics with ``field`` rewritten on the broker: refused
    ``forged``, named in the events; a's statistics alone are pooled (before: only the
    weight bytes and count were signed, and b's answer was pooled)."""
    rnd = run_calibration(tmp_path, CALIBRATION_TAMPERS[field])
    cal = rnd["bn_calibration"]
    assert cal["hospitals"] == {"a": 1}
    assert cal["rejected"]["b"] == "forged: payload does not match the signed digest"
    assert any("BatchNorm statistics from b rejected (forged" in m for m in rnd["events"])


# ---------------------------------------------------------------- head statistics


def run_head(tmp_path, tamper: Tamper | None) -> tuple[Answer, list[str]]:
    keys = _keys()
    return run_plain(tmp_path, {
        "a": signed(keys["a"], head_statistics([4, 4, 4, 4])),
        "b": signed(keys["b"], head_statistics([2, 6, 3, 5]), tamper, on="calibrate")},
        keys, ops=HeadOps(), head_rebalance=True)


def test_untouched_signed_head_statistics_are_pooled(tmp_path) -> None:
    rnd, _ = run_head(tmp_path, None)
    assert rnd["head_rebalance"]["hospitals"] == ["a", "b"]


@pytest.mark.parametrize("field", sorted(CALIBRATION_TAMPERS))
def test_attack_head_statistics_field_outside_its_payload_changed_after_signing(
        tmp_path, field: str) -> None:
    rnd, events = run_head(tmp_path, CALIBRATION_TAMPERS[field])
    head = rnd["head_rebalance"]
    assert head["hospitals"] == ["a"] and head["pooled_class_images"] == [4, 4, 4, 4]
    assert head["rejected"]["b"] == "forged: payload does not match the signed digest"
    assert any("head statistics from b rejected (forged" in m for m in events), events


# ---------------------------------------------------------------- describe


@pytest.mark.parametrize("field", sorted(DESCRIBE_TAMPERS))
def test_attack_declaration_field_outside_the_old_digest_changed_after_signing(
        tmp_path, field: str) -> None:
    """b's signed declaration with ``field`` rewritten, dropped or added on the broker (the
    old digest covered only the declared numbers and the nonce): refused ``forged``, so b
    is undeclared and nothing it sends counts this round; a's round goes on."""
    keys = _keys()
    rnd, events = run_plain(tmp_path, {h: signed(keys[h], evaluating(1.0, 16, HALF))
                                       for h in "ab"}, keys,
                            describe_tamper=DESCRIBE_TAMPERS[field])
    assert any("describe answer of b refused (forged: payload does not match the signed "
               "digest)" in m for m in events), events
    assert rnd["participants"] == {"a": 16}
    assert rnd["rejected"]["b"].startswith("undeclared")


# ---------------------------------------------------------------- secure stages

STAGE_TASKS = {"keys": TASK_SECAGG_KEYS, "shares": TASK_SECAGG_SHARES,
               "reveal": TASK_SECAGG_REVEAL}
SECURE_TAMPERS: dict[str, Tamper] = {
    "added_field": _set("note", "added on the broker"),
    "hospital": _set("hospital", "mallory"),
    "round": _set("round", 7),
    "stage": _set("stage", "masked"),
}


def stage_rewritten(key: Ed25519PrivateKey, n: int, stage: str, tamper: Tamper) -> Behaviour:
    """The real secure side of a hospital (services.client.secure, signing with ``key``)
    whose ``stage`` answer is changed by ``tamper`` on its way."""
    honest = signing_hospital(0.1, n, key)

    def answer(task: str, args: list[Any], hospital: str) -> Answer:
        out = honest(task, args, hospital)
        if task == STAGE_TASKS[stage]:
            tamper(out)
        return out
    return answer


@pytest.mark.parametrize("stage", sorted(STAGE_TASKS))
@pytest.mark.parametrize("field", sorted(SECURE_TAMPERS))
def test_attack_secure_stage_field_outside_its_signed_body(tmp_path, stage: str,
                                                          field: str) -> None:
    """d's keys, shares or reveal answer with a field beside its signed body added or
    rewritten: refused (signature forged) at that stage with d named in the events; the
    secure sum and the round go on with the others (before: the answer was taken, its
    unsigned fields along with it)."""
    keys = {h: Ed25519PrivateKey.generate() for h in "abcd"}
    behaviours = {h: signing_hospital(0.1, 20, keys[h]) for h in "abc"}
    behaviours["d"] = stage_rewritten(keys["d"], 20, stage, SECURE_TAMPERS[field])
    _, rec, tracker = run_signed(tmp_path, behaviours, keys, rounds=1)
    assert rec["status"] == "completed", rec["reason"]
    assert len(tracker.registry) == 1, "the round's version is registered"
    sa = rec["rounds"][0]["secure_aggregation"]
    assert sa["answered"][stage] == ["a", "b", "c"]
    assert any(f"secure fit {stage}: d rejected (signature forged" in e["message"]
               and e.get("hospital") == "d" for e in rec["events"]), rec["events"]


# ---------------------------------------------------------------- the real hospital


def test_attack_real_hospital_answers_rewritten_on_the_broker(
        tmp_path, synthetic_dataset, global_blob: bytes) -> None:  # noqa: F811
    """The worker's own evaluate, calibrate (BatchNorm and head statistics) and describe
    answers (services.client.hospital, its real key), after a msgpack round trip as Celery
    carries them: each verifies as sent, and each field outside its old payload rewritten
    afterwards makes the aggregator's verifier refuse it ``forged``."""
    public = generate_keypair(tmp_path / "keys", "a")[1]
    client = HospitalClient(ClientSettings(
        hospital_id="a", data_dir=synthetic_dataset(per_class=12),
        state_dir=tmp_path / "state", cache_dir=tmp_path / "cache", block_size=2,
        signing_key_file=tmp_path / "keys/a.key"))
    sent = {
        "evaluation": (client.evaluate(global_blob, CFG, task_id="t-eval"), "t-eval",
                       EVALUATION_TAMPERS),
        "calibration": (client.calibrate(global_blob, {**CFG, "calibration_images": 10},
                                         task_id="t-cal"), "t-cal", CALIBRATION_TAMPERS),
        "head statistics": (client.calibrate(global_blob, {**CFG, "measure": "head"},
                                             task_id="t-head"), "t-head",
                            CALIBRATION_TAMPERS),
        "describe": (client.describe(config={**CFG, "nonce": "n" * 32}, task_id="t-desc"),
                     "t-desc", DESCRIBE_TAMPERS),
    }
    verifier = UpdateVerifier({"a": load_public_key(public)})

    def check(answer: Answer, kind: str, task_id: str) -> str:
        verifier.nonces = NonceCache()  # each a first delivery: a replay is not tested here
        wire = msgpack.unpackb(msgpack.packb(answer, use_bin_type=True), raw=False)
        try:
            verifier(wire, "a", CFG["run_id"], CFG["round"], kind=kind, task_id=task_id,
                     global_digest=None if kind == "describe" else blob_digest(global_blob))
        except SignatureRejected as exc:
            return f"{exc.reason}: {exc.message}"
        return "ok"

    for kind, (answer, task_id, tampers) in sent.items():
        assert answer["status"] == "ok", (kind, answer)
        assert check(answer, kind, task_id) == "ok", kind
        for field, tamper in sorted(tampers.items()):
            changed = copy.deepcopy(answer)  # the hospital's own signature rides along
            tamper(changed)
            assert check(changed, kind, task_id) == \
                "forged: payload does not match the signed digest", (kind, field)


# ---------------------------------------------------------------- a bad count, one round

BAD_COUNTS = {"inflated": (10**9, "inflated: claims 1000000000 training examples, "
                                  "declared 16"),
              "zero": (0, "schema: num_examples must be a positive int, got 0"),
              "negative": (-5, "schema: num_examples must be a positive int, got -5")}


def counting(key: Ed25519PrivateKey, bad: int) -> Behaviour:
    """Signs every answer with its own key (so the signature holds); claims ``bad``
    examples in its round-1 fit, 16 afterwards."""
    def inner(task: str, args: list[Any], hospital: str) -> Answer:
        n = bad if args[1]["round"] == 1 else 16
        return evaluating(5.0, n, PERFECT_4)(task, args, hospital)
    return signed(key, inner)


@pytest.mark.parametrize("how", sorted(BAD_COUNTS))
def test_attack_bad_count_from_one_hospital_leaves_the_other_rounds_running(
        tmp_path, how: str) -> None:
    """b signs a fit answer claiming 10**9, 0 or -5 examples in round 1 (its own key, so
    only the count check stops it): b is rejected with the reason in an event naming it,
    round 1 goes on with a, and round 2, where b is honest, counts both: the run
    completes. (Under secure aggregation, where the count is checked on the sum only:
    test_secure_sum_checks.py::test_attack_secure_count_coordinate_scales_the_mean.)"""
    bad, reason = BAD_COUNTS[how]
    keys = _keys()
    clock = Clock()
    d = TamperedDeclaring(clock, {"a": signed(keys["a"], evaluating(1.0, 16, HALF)),
                                  "b": counting(keys["b"], bad)}, keys, {})
    run = make_run(tmp_path, d, clock, rounds=2, min_fit_clients=1, hospitals=["a", "b"])
    run.deps.verifier = UpdateVerifier({h: k.public_key() for h, k in keys.items()})
    rec = run.execute()
    assert rec["status"] == "completed", rec["reason"]
    first, second = rec["rounds"]
    assert first["participants"] == {"a": 16} and first["rejected"] == {"b": reason}
    assert second["participants"] == {"a": 16, "b": 16}
    named = [e for e in rec["events"] if e.get("hospital") == "b" and e.get("rejected")]
    assert [e["message"] for e in named] == [f"round 1: update from b rejected ({reason})"]
    weights, _ = run.store.read_checkpoint(rec)
    # Round 1 is a's +1 alone (not b's +5 at 10**9 examples); round 2 the mean +3.
    np.testing.assert_allclose(weights["dense/kernel"], np.full((2, 2), 4.0))


# ---------------------------------------------------------------- declined and error answers

BUDGET = ("refused: this round would take the run's epsilon on this hospital's images from "
          "7.900 to 8.400 at delta 1e-05, above the run's target 8")


def refusing(key: Ed25519PrivateKey | None, tamper: Tamper | None = None) -> Behaviour:
    """Declines every fit for its privacy budget, as the hospital words it; the answer
    signed (kind ``status``) with ``key`` for its run, round and task as the worker signs
    it (None: unsigned), then changed by ``tamper`` on the way."""
    honest = evaluating(1.0, 16, HALF)

    def answer(task: str, args: list[Any], hospital: str) -> Answer:
        config = args[1]
        if not task.endswith("fit"):
            return signed(keys_of[hospital], honest)(task, args, hospital)
        out: Answer = {"status": "declined", "hospital": hospital, "reason": "privacy_budget",
                       "message": BUDGET, "round": config["round"],
                       "run_id": config["run_id"]}
        if key is not None:
            out["signature"] = sign_answer(key, "status", hospital, config["run_id"],
                                           config["round"], out)
        if tamper is not None:
            tamper(out)
        return out
    keys_of: dict[str, Ed25519PrivateKey] = {}
    answer.keys_of = keys_of  # type: ignore[attr-defined]
    return answer


REFUSAL_TAMPERS: dict[str, Tamper] = {
    "reason": _set("reason", "paused"),
    "message": _set("message", "refused: this hospital leaves the consortium"),
    "status": _set("status", "error"),
}


def run_refusal(tmp_path, b: Behaviour, keys: dict[str, Ed25519PrivateKey]
                ) -> tuple[Answer, list[str]]:
    b.keys_of.update(keys)  # type: ignore[attr-defined]
    return run_plain(tmp_path, {"a": signed(keys["a"], evaluating(1.0, 16, HALF)), "b": b},
                     keys)


def test_a_signed_refusal_is_recorded_as_the_hospital_said_it(tmp_path) -> None:
    keys = _keys()
    rnd, events = run_refusal(tmp_path, refusing(keys["b"]), keys)
    assert rnd["failed"]["b"] == f"declined: privacy_budget ({BUDGET})"
    assert not any("unverified" in m for m in events), events


@pytest.mark.parametrize("field", sorted(REFUSAL_TAMPERS))
def test_attack_refusal_rewritten_on_the_broker_is_marked_unverified(tmp_path,
                                                                     field: str) -> None:
    """b's signed decline with its reason, message or status rewritten on the way (why b
    did not train, as the run's events would tell it): still a failure (a refusal never
    counts), but the events say it is not b's word (before: recorded as b's, unmarked)."""
    keys = _keys()
    rnd, events = run_refusal(tmp_path, refusing(keys["b"], REFUSAL_TAMPERS[field]), keys)
    assert rnd["participants"] == {"a": 16}
    assert rnd["failed"]["b"].endswith(
        "[unverified: forged: payload does not match the signed digest]"), rnd["failed"]
    assert any("fit: b " in m and "[unverified: forged" in m for m in events), events


def test_attack_refusal_injected_unsigned_is_marked_unverified(tmp_path) -> None:
    """An unsigned decline in b's name (injected on the broker in place of its answer)."""
    keys = _keys()
    rnd, _ = run_refusal(tmp_path, refusing(None), keys)
    assert rnd["failed"]["b"].endswith("[unverified: unsigned: no signature]"), rnd["failed"]


def test_the_worker_signs_its_refusals(tmp_path, synthetic_dataset) -> None:
    """The worker's own decline (a paused hospital, services.client.worker.answered) is
    signed for its run, round and task; rewritten, it no longer verifies."""
    from services.client.worker import answered

    public = generate_keypair(tmp_path / "keys", "a")[1]
    client = HospitalClient(ClientSettings(
        hospital_id="a", data_dir=synthetic_dataset(per_class=2),
        state_dir=tmp_path / "state", cache_dir=tmp_path / "cache",
        signing_key_file=tmp_path / "keys/a.key"))
    client.pause_switch.pause("audit")
    sent = answered(client, None, client.fit(b"", CFG, task_id="t-1"), "t-1")
    assert sent["status"] == "declined" and sent["reason"] == "paused" and "signature" in sent
    verifier = UpdateVerifier({"a": load_public_key(public)})
    wire = msgpack.unpackb(msgpack.packb(sent, use_bin_type=True), raw=False)
    verifier(wire, "a", CFG["run_id"], CFG["round"], kind="status", task_id="t-1")
    verifier.nonces = NonceCache()
    with pytest.raises(SignatureRejected, match="signed digest"):
        verifier({**wire, "reason": "privacy_budget"}, "a", CFG["run_id"], CFG["round"],
                 kind="status", task_id="t-1")
    with pytest.raises(SignatureRejected, match="not 't-2'"):
        verifier(wire, "a", CFG["run_id"], CFG["round"], kind="status", task_id="t-2")


# ---------------------------------------------------------------- who an answer shows alive


def test_attack_answer_naming_another_hospital_does_not_make_it_look_live() -> None:
    """In isolated mode hospital a's worker writes the results under a's prefix, and its
    answer's ``hospital`` field is whatever a puts there: an answer naming b made b look
    seen (/v1/hospitals, leukofed_hospital_last_seen_seconds), although only a answered.
    Now the dispatcher credits the hospital it sent the task to."""
    from types import SimpleNamespace

    from services.aggregator.dispatch import CeleryDispatcher

    class Handle:
        def __init__(self, task_id: str) -> None:
            self.id, self.state = task_id, "SUCCESS"
            self.result = {"status": "ok", "hospital": "b"}  # a's answer, naming b

        def forget(self) -> None:
            pass

    class App:  # one hospital's Celery app (its key prefix)
        backend = SimpleNamespace(result_consumer=None)

        def send_task(self, *args: Any, **kwargs: Any) -> Handle:
            return Handle("task-1")

    d = CeleryDispatcher(None, hospital_app=lambda h: App())
    handle = d.submit("a", "leukofed.client.fit", [b"", {}], expires=2e9)
    done, result, _ = d.poll(handle)
    assert done and result == {"status": "ok", "hospital": "b"}
    assert set(d.last_seen) == {"a"}
    d.discard(handle)
    assert not d._sent_to  # forgotten with the handle
