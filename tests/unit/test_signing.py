"""Ed25519 signing of tasks and updates: every way a message can be wrong has its reason code,
and the hospital client refuses tasks the aggregator did not sign."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from leukofed import signing
from leukofed.transport import TASK_EVALUATE, TASK_FIT
from leukofed.wire import encode_weights


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    signing.main(["generate", "--out", str(tmp_path / "keys"), "aggregator", "a", "b"])
    return tmp_path / "keys"


def answer(key, hospital="a", run="r1", round=3, blob=b"weights", n=10) -> dict:
    return {"weights": blob, "num_examples": n,
            "signature": signing.sign_update(key, hospital, run, round, blob, n)}


def reason(keys_dir: Path, ans: dict, hospital="a", run="r1", round=3,
           nonces: signing.NonceCache | None = None) -> str:
    pubs = signing.load_public_keys(keys_dir)
    try:
        signing.verify_update(pubs, ans, hospital, run, round, nonces)
    except signing.SignatureRejected as exc:
        return exc.reason
    return "ok"


def test_key_files_private_key_0600_and_no_silent_overwrite(keys: Path) -> None:
    assert stat.S_IMODE((keys / "a.key").stat().st_mode) == 0o600
    assert set(signing.load_public_keys(keys)) == {"aggregator", "a", "b"}
    with pytest.raises(FileExistsError):
        signing.generate_keypair(keys, "a")
    old = (keys / "a.pub").read_bytes()
    signing.generate_keypair(keys, "a", overwrite=True)  # rotation
    assert (keys / "a.pub").read_bytes() != old


def test_update_signature_accepts_genuine_and_rejects_each_attack(keys: Path) -> None:
    a = signing.load_private_key(keys / "a.key")
    b = signing.load_private_key(keys / "b.key")
    good = answer(a)
    assert reason(keys, good) == "ok"
    assert reason(keys, {k: v for k, v in good.items() if k != "signature"}) == "unsigned"
    assert reason(keys, {**good, "signature": {"sig": b"x"}}) == "unsigned"
    # b signs an update and claims to be a: b's signature does not verify with a's key
    assert reason(keys, answer(b, hospital="a")) == "forged"
    # b's genuine update offered as a's: claims name b
    assert reason(keys, answer(b, hospital="b"), hospital="a") == "forged"
    # weights or example count altered after signing
    assert reason(keys, {**good, "weights": b"weightz"}) == "forged"
    assert reason(keys, {**good, "num_examples": 1000}) == "forged"
    # a claim edited in the envelope breaks the signature
    assert reason(keys, {**good, "signature": {**good["signature"], "round": 4}},
                  round=4) == "forged"
    # an old round's or another run's genuine update
    assert reason(keys, good, round=4) == "replay"
    assert reason(keys, good, run="r2") == "replay"
    # the very same message twice
    nonces = signing.NonceCache()
    assert reason(keys, good, nonces=nonces) == "ok"
    assert reason(keys, good, nonces=nonces) == "replay"
    assert reason(keys, answer(a, hospital="z"), hospital="z") == "unknown_key"


def test_task_signature_binds_task_hospital_and_arguments(keys: Path) -> None:
    agg = signing.load_private_key(keys / "aggregator.key")
    pub = signing.load_public_key(keys / "aggregator.pub")
    args = [b"blob", {"run_id": "r1", "round": 2, "deadline": 1.5}]
    auth = signing.sign_task(agg, TASK_FIT, "a", args)
    signing.verify_task(pub, auth, TASK_FIT, "a", args)

    def code(**change) -> str:
        kw = {"auth": auth, "task": TASK_FIT, "hospital": "a", "args": args, **change}
        try:
            signing.verify_task(pub, kw["auth"], kw["task"], kw["hospital"], kw["args"],
                                max_age_s=kw.get("max_age_s"))
        except signing.SignatureRejected as exc:
            return exc.reason
        return "ok"

    assert code(auth=None) == "unsigned"
    assert code(task=TASK_EVALUATE) == "forged"
    assert code(hospital="b") == "forged"
    assert code(args=[b"other", args[1]]) == "forged"
    assert code(args=[b"blob", {**args[1], "round": 3}]) == "replay"
    forged = signing.sign_task(signing.load_private_key(keys / "a.key"), TASK_FIT, "a", args)
    assert code(auth=forged) == "forged"
    assert code(auth={**auth, "signed_at": auth["signed_at"] - 100}) == "forged"
    assert code(auth=signing.sign(agg, kind="task", signer="aggregator", run="r1", round=2,
                                  hospital="a", digest=signing.task_digest(TASK_FIT, args),
                                  now=0.0), max_age_s=60) == "expired"


def test_client_refuses_unsigned_and_forged_tasks_and_signs_its_update(
        tmp_path: Path, keys: Path, synthetic_dataset) -> None:
    from leukofed.models import build_model
    from leukofed.wire import weights_from_model
    from services.client.hospital import HospitalClient
    from services.client.settings import ClientSettings

    settings = ClientSettings(hospital_id="a", data_dir=synthetic_dataset(per_class=4),
                              state_dir=tmp_path / "state", cache_dir=tmp_path / "cache",
                              block_size=2, signing_key_file=keys / "a.key",
                              aggregator_public_key_file=keys / "aggregator.pub")
    client = HospitalClient(settings)
    blob = encode_weights(weights_from_model(build_model("compact_cnn", 32, seed=0)))
    cfg = {"run_id": "r1", "round": 1, "model": "compact_cnn", "image_size": 32,
           "batch_size": 8, "jit_compile": False}

    unsigned = client.fit(blob, cfg)
    assert unsigned["status"] == "declined" and unsigned["reason"] == "task_unsigned"
    by_hospital = signing.sign_task(signing.load_private_key(keys / "b.key"), TASK_FIT, "a",
                                    [blob, cfg])
    assert client.fit(blob, cfg, by_hospital)["reason"] == "task_forged"
    assert client.describe()["reason"] == "task_unsigned"

    agg = signing.load_private_key(keys / "aggregator.key")
    auth = signing.sign_task(agg, TASK_FIT, "a", [blob, cfg])
    fit = client.fit(blob, cfg, auth)
    assert fit["status"] == "ok"
    assert client.fit(blob, cfg, auth)["reason"] == "task_replay"  # same message redelivered
    signing.verify_update(signing.load_public_keys(keys), fit, "a", "r1", 1)
    assert [e["status"] for e in client.participation.entries()] == [
        "refused", "refused", "refused", "ok", "refused"]


def test_every_answer_is_signed_for_its_kind_its_task_and_its_global_weights(keys: Path
                                                                             ) -> None:
    """Evaluation, calibration and describe answers are signed like updates, a signature of
    one kind is never valid as another, and each names the task it answers and the digest
    of the global weights it was computed on (issue 11, item 3)."""
    key = signing.load_private_key(keys / "a.key")
    pubs = signing.load_public_keys(keys)
    glob = signing.blob_digest(b"global weights of round 3")
    evaluation = {"splits": {"test": {"n": 4, "loss": 0.1, "accuracy": 1.0,
                                      "confusion_matrix": [[1, 0, 0, 0], [0, 1, 0, 0],
                                                           [0, 0, 1, 0], [0, 0, 0, 1]]}},
                  "num_examples": 4}
    evaluation["signature"] = signing.sign_answer(key, "evaluation", "a", "r1", 3, evaluation,
                                                  glob, "task-42")

    def check(ans: dict, kind: str = "evaluation", global_digest: str | None = glob,
              task_id: str | None = "task-42") -> str:
        try:
            signing.verify_answer(pubs, ans, kind, "a", "r1", 3, global_digest, task_id)
        except signing.SignatureRejected as exc:
            return exc.reason
        return "ok"

    assert check(evaluation) == "ok"
    forged = {**evaluation, "splits": {"test": {**evaluation["splits"]["test"], "n": 10_000}}}
    assert check(forged) == "forged"  # the numbers are covered
    assert check(evaluation, global_digest=signing.blob_digest(b"another model")) == "replay"
    assert check(evaluation, task_id="task-41") == "replay"
    # The membership audit's histograms are covered too: added or changed, they are forged.
    from leukofed.membership import hospital_histograms

    hist = hospital_histograms([0.1, 0.2], [0.5])
    assert check({**evaluation, "membership": hist}) == "forged"
    audited = {**evaluation, "membership": hist}
    audited["signature"] = signing.sign_answer(key, "evaluation", "a", "r1", 3, audited, glob,
                                               "task-42")
    assert check(audited) == "ok"
    assert check({**audited, "membership": hospital_histograms([0.5, 0.2], [0.1])}) == "forged"
    update = answer(key)
    assert check({**update, "splits": None}, kind="evaluation", global_digest=None,
                 task_id=None) == "forged"  # an update's signature is not an evaluation's
    calibration = {"weights": b"stats", "num_examples": 5}
    calibration["signature"] = signing.sign_answer(key, "calibration", "a", "r1", 3,
                                                   calibration, glob, "task-43")
    assert check(calibration, "calibration", glob, "task-43") == "ok"
    assert check(calibration, "update", glob, "task-43") == "forged"
    describe = {"class_counts": {"Benign": 3}, "num_images": 3, "splits": {"train": 3},
                "split_counts": {}, "dataset_fingerprint": "fp", "bad_files": 0,
                "paused": False, "nonce": "n1"}
    describe["signature"] = signing.sign_answer(key, "describe", "a", "r1", 3, describe, "",
                                                "task-44")
    verifier = signing.UpdateVerifier(pubs)
    with pytest.raises(signing.SignatureRejected, match="signed digest"):
        verifier({**describe, "splits": {"train": 10**9}}, "a", "r1", 3, kind="describe")
    # Bound to its run, round, task and challenge, and taken once (issue 26, finding 1).
    assert check(describe, "describe", None, "task-44") == "ok"
    assert check({**describe, "nonce": "n2"}, "describe", None, "task-44") == "forged"
    assert check(describe, "describe", None, "task-45") == "replay"
    verifier(describe, "a", "r1", 3, kind="describe", task_id="task-44")
    with pytest.raises(signing.SignatureRejected, match="seen before"):
        verifier(describe, "a", "r1", 3, kind="describe", task_id="task-44")
