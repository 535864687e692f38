"""Issue 26, finding 7: what a fit answer carries beside its weights (metrics, timings, class
counts, dataset fingerprint, acquisition-profile and stain sums, byte count) was outside the
hospital's signature, and under secure aggregation it was added after signing. Anyone on
the broker could rewrite it; the acquisition profile becomes the served model's "refer"
check, the class counts and metrics go into the registry.

Now a hospital signs a fit answer (plain: kind ``update``; secure: the ``masked`` stage)
over every field it carries, after the last one is set, and the aggregator refuses an
answer in which any of them changed after signing: that hospital is rejected ``forged``
with the reason in the events, and the round goes on with the others. The hospitals sign
with real Ed25519 keys (leukofed.signing, services.client.secure) and the aggregator runs
its real verifier."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_client_service import CFG, global_blob  # noqa: F401 - a fixture
from test_declarations import DECLARED, Declaring
from test_round_loop import Clock, make_run
from test_secure_rounds import run_signed, signing_hospital

from leukofed.audit import stain_sums
from leukofed.labels import CLASSES
from leukofed.ood import ProfileStats
from leukofed.protocol import FitAnswer, RoundConfig
from leukofed.signing import (
    NonceCache,
    UpdateVerifier,
    blob_digest,
    generate_keypair,
    load_public_key,
    sign_answer,
)
from leukofed.validation import check_tensor_answers
from leukofed.wire import decode_weights, encode_weights
from services.client.hospital import HospitalClient
from services.client.settings import ClientSettings

Answer = dict[str, Any]
Tamper = Callable[[Answer], None]
N = DECLARED["train"]  # training images each hospital declares and uses


def training_profile(seed: int) -> Answer:
    """The acquisition and stain sums of ``N`` images, as the hospital computes them."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (N, 16, 16, 3), dtype=np.uint8)
    y = np.arange(N) % len(CLASSES)
    return {"acquisition": ProfileStats.of_images(x).to_dict(),
            "stain_sums": stain_sums(x, y, len(CLASSES))}


def fit_answer(blob: bytes, cfg: Answer, hospital: str, seed: int, profile: bool = True
               ) -> Answer:
    """A complete fit answer (every field the worker sends) adding 1.0 to every weight."""
    update = {k: v + np.asarray(1.0, v.dtype) for k, v in decode_weights(blob).items()}
    out = encode_weights(update)
    return FitAnswer.model_validate(dict(
        hospital=hospital, run_id=cfg["run_id"], round=cfg["round"], weights=out,
        bytes=len(out), sha256=blob_digest(out), num_examples=N,
        metrics={"loss": 1.2, "accuracy": 0.5}, class_counts={c: N // 4 for c in CLASSES},
        dataset_fingerprint=f"fp-{hospital}",
        timings={"load_s": 0.1, "train_s": 2.0, "encode_s": 0.1, "total_s": 2.2},
        **(training_profile(seed) if profile else {}))).encode()


def signed_fit_hospital(key: Ed25519PrivateKey, seed: int, tamper: Tamper | None = None,
                        profile: bool = True):
    """Fit: a complete answer signed with ``key`` as the worker signs it (the last step),
    then changed by ``tamper`` on its way (someone with broker access); evaluate: honest."""
    def answer(task: str, args: list[Any], hospital: str) -> Answer:
        blob, cfg = args[0], args[1]
        if task.endswith("evaluate"):
            cm = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
            return {"status": "ok", "hospital": hospital, "splits": {
                "test": {"n": 4, "loss": 0.5, "accuracy": 1.0, "confusion_matrix": cm}}}
        out = fit_answer(blob, cfg, hospital, seed, profile)
        out["signature"] = sign_answer(key, "update", hospital, cfg["run_id"], cfg["round"],
                                       out, blob_digest(blob))
        if tamper is not None:
            tamper(out)
        return out
    return answer


def _set(field: str, value: Any) -> Tamper:
    def tamper(answer: Answer) -> None:
        answer[field] = value
    return tamper


def _acquisition_shifted(answer: Answer) -> None:
    """Every image statistic moved far off: the served model would refer every real image
    (or accept what it should refer)."""
    acq = answer["acquisition"]
    acq["total"] = [t + 1000.0 * acq["count"] for t in acq["total"]]


def _stain_counts_inflated(answer: Answer) -> None:
    answer["stain_sums"]["counts"] = [c * 1000 for c in answer["stain_sums"]["counts"]]


# Each field a fit answer carries, changed after the hospital signed it.
TAMPERS: dict[str, Tamper] = {
    "metrics": _set("metrics", {"loss": 0.01, "accuracy": 1.0}),
    "timings": _set("timings", {"total_s": 0.0}),
    "class_counts": _set("class_counts", {c: 10**6 for c in CLASSES}),
    "dataset_fingerprint": _set("dataset_fingerprint", "fp-a"),
    "acquisition": _acquisition_shifted,
    "acquisition_dropped": lambda a: a.pop("acquisition"),
    "stain_sums": _stain_counts_inflated,
    "bytes": _set("bytes", 1),
    "sha256": _set("sha256", "0" * 64),
    "extra_field": _set("note", "added on the broker"),
}


def run_round(tmp_path, b: Any, **config: Any) -> tuple[Answer, list[str]]:
    """One round of a (honest, signed) and b, the aggregator checking every signature."""
    keys = {h: Ed25519PrivateKey.generate() for h in "ab"}
    clock = Clock()
    behaviours = {"a": signed_fit_hospital(keys["a"], 1), "b": b(keys["b"])}
    d = Declaring(clock, behaviours, keys, {})  # signed declarations of N training images
    run = make_run(tmp_path, d, clock, rounds=1, min_fit_clients=1, **config)
    run.deps.verifier = UpdateVerifier({h: k.public_key() for h, k in keys.items()})
    rec = run.execute()
    assert rec["status"] == "completed", rec["reason"]
    return rec["rounds"][0], [e["message"] for e in rec["events"]]


@pytest.mark.parametrize("fold", [True, False], ids=["streamed", "held"])
def test_an_untouched_signed_fit_answer_is_taken_whole(tmp_path, fold: bool) -> None:
    """The control: b's answer as it signed it counts, side data included (the attack
    tests below differ from it in the tampering only)."""
    rnd, _ = run_round(tmp_path, lambda key: signed_fit_hospital(key, 2),
                       strategy="fedavg" if fold else "fedmedian")
    assert rnd["participants"] == {"a": N, "b": N} and not rnd["rejected"]
    assert rnd["fingerprints"] == {"a": "fp-a", "b": "fp-b"}
    assert rnd["acquisition_profile"]["count"] == 2 * N


@pytest.mark.parametrize("field", sorted(TAMPERS))
def test_attack_fit_side_data_changed_after_signing_is_refused(tmp_path, field: str) -> None:
    """b's genuinely signed fit answer has ``field`` changed (added, dropped) on its way:
    refused ``forged`` with the reason logged; the round completes with a alone, and
    nothing of b's answer reaches the profile, the fingerprints or the class counts (on
    the old code the signature held, and b's rewritten numbers were pooled)."""
    rnd, events = run_round(tmp_path, lambda key: signed_fit_hospital(key, 2, TAMPERS[field]))
    assert rnd["participants"] == {"a": N}
    assert rnd["rejected"]["b"] == "forged: payload does not match the signed digest"
    assert any("update from b rejected (forged" in m for m in events), events
    assert rnd["fingerprints"] == {"a": "fp-a"}
    assert rnd["acquisition_profile"]["count"] == N  # a's images only
    assert set(rnd["class_counts"]) == {"a"}


def test_attack_acquisition_profile_added_after_signing_is_refused(tmp_path) -> None:
    """b signed an answer without a profile (send_profile off); a profile added on the
    broker would have become the served model's refer check. Refused ``forged``."""
    forged = training_profile(99)["acquisition"]
    rnd, events = run_round(tmp_path, lambda key: signed_fit_hospital(
        key, 2, _set("acquisition", forged), profile=False))
    assert rnd["rejected"]["b"].startswith("forged")
    assert rnd["participants"] == {"a": N} and rnd["acquisition_profile"]["count"] == N


def test_attack_real_hospital_fit_answer_rewritten_on_the_broker(
        tmp_path, synthetic_dataset, global_blob: bytes) -> None:  # noqa: F811
    """The worker's own fit (services.client.hospital, a real training step, its real key):
    its answer as sent is accepted whole, and each side field rewritten afterwards makes
    the aggregator's check refuse it ``forged``."""
    public = generate_keypair(tmp_path / "keys", "a")[1]
    client = HospitalClient(ClientSettings(
        hospital_id="a", data_dir=synthetic_dataset(per_class=8), state_dir=tmp_path / "state",
        cache_dir=tmp_path / "cache", block_size=2, signing_key_file=tmp_path / "keys/a.key"))
    sent = client.fit(global_blob, CFG, task_id="task-1")
    assert sent["status"] == "ok" and {"acquisition", "stain_sums", "metrics", "class_counts",
                                       "dataset_fingerprint", "timings"} <= set(sent)
    verifier = UpdateVerifier({"a": load_public_key(public)})
    declared = {"a": {"train": 10_000, "val": 10_000, "test": 10_000}}

    def check(answer: Answer) -> dict[str, str]:
        _, rejected = check_tensor_answers(
            {"a": answer}, lambda a, h: verifier(a, h, CFG["run_id"], CFG["round"],
                                                 global_digest=blob_digest(global_blob),
                                                 task_id="task-1"),
            declared, lambda tensors: None)
        return rejected
    assert check(sent) == {}
    for field, tamper in sorted(TAMPERS.items()):
        answer = copy.deepcopy(sent)  # the hospital's own signature rides along
        verifier.nonces = NonceCache()  # each a first delivery: a replay is not tested here
        tamper(answer)
        assert check(answer) == {"a": "forged: payload does not match the signed digest"}, \
            field


# ---------------------------------------------------------------- secure aggregation

CAPS = {"a": 20, "b": 20, "c": 20}


def side_data_rewritten(key: Ed25519PrivateKey, tamper: Tamper | None):
    """A hospital running its real secure side, signing with ``key`` (the masked vector and
    its report, signed whole as the worker does), whose round-1 fit answer is then changed
    by ``tamper`` on its way."""
    honest = signing_hospital(0.1, CAPS["c"], key)

    def answer(task: str, args: list[Any], hospital: str) -> Answer | None:
        out = honest(task, args, hospital)
        if task.endswith(".fit") and RoundConfig.decode(args[1]).round == 1 and tamper:
            tamper(out)
        return out
    return answer


def run_secure(tmp_path, tamper: Tamper | None) -> tuple[Answer, list[str]]:
    keys = {h: Ed25519PrivateKey.generate() for h in CAPS}
    behaviours = {h: signing_hospital(0.1, CAPS[h], keys[h]) for h in ("a", "b")}
    behaviours["c"] = side_data_rewritten(keys["c"], tamper)
    _, rec, _ = run_signed(tmp_path, behaviours, keys, rounds=1)
    assert rec["status"] == "completed", rec["reason"]
    return rec["rounds"][0], [e["message"] for e in rec["events"]]


SECURE_TAMPERS: dict[str, Tamper] = {
    "metrics": _set("metrics", {"loss": 0.01}),
    "timings": _set("timings", {"total_s": 0.0}),
    "class_counts": _set("class_counts", {c: 10**6 for c in CLASSES}),
    "acquisition": _set("acquisition", training_profile(99)["acquisition"]),
    "clipped_coordinates": _set("clipped_coordinates", 10**6),
}


def test_a_masked_vector_signed_with_its_report_is_summed(tmp_path) -> None:
    rnd, _ = run_secure(tmp_path, None)
    assert rnd["secure_aggregation"]["answered"]["masked"] == ["a", "b", "c"]


@pytest.mark.parametrize("field", sorted(SECURE_TAMPERS))
def test_attack_secure_fit_report_changed_after_signing_is_refused(tmp_path,
                                                                   field: str) -> None:
    """Under secure aggregation the report beside c's masked vector was added after
    signing, so anyone could write it. Now it is signed with the vector: c's answer with
    ``field`` changed is refused (signature forged, named in the events), and the secure
    sum goes on over a and b (on the old code c's rewritten report was taken)."""
    rnd, events = run_secure(tmp_path, SECURE_TAMPERS[field])
    sa = rnd["secure_aggregation"]
    assert sa["answered"]["masked"] == ["a", "b"]
    assert sa["dropped_after_shares"] == ["c"]
    assert any("secure fit masked: c rejected (signature forged" in m for m in events), events
    assert rnd["participants"] == {"a": CAPS["a"], "b": CAPS["b"]}
