"""Issue 26, finding 4: under secure aggregation one hospital wrote its own coordinates into
its masked vector (they are only numbers mod 2^bits) and signed it: the count became 6e-05
instead of 400, the mean update 67108 instead of 0.01, and that version was registered.
Now the aggregator checks the unmasked sum before using it: the count against what the
survivors declared, every coordinate's mean against the range it was clipped to. A sum that
fails is refused, the round aborted with the reason, and the run goes on.

The hospitals run their real secure side (services.client.secure) and sign every message
with their own Ed25519 key; the aggregator checks each signature (test_secure_rounds)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_round_loop import Clock, FakeDispatcher, FakeTracker, make_run
from test_secure_rounds import SecureAnswersVerifier, signing_hospital

from leukofed.protocol import RoundConfig
from leukofed.secagg import pack, unpack
from leukofed.signing import sign_secagg, signed_fields

# Declared (and used) training images: a count of 400. Three hospitals, so that each has
# the two neighbours a hospital shares its secrets with at the least.
CAPS = {"a": 200, "b": 100, "c": 100}
DELTA = 0.01  # what every hospital adds to every weight: the honest mean update
Forge = Callable[[np.ndarray, dict[str, Any]], np.ndarray]


def _scale(secure: dict[str, Any], value_range: float = 1.0) -> float:
    """Integer steps per unit of the summed value (leukofed.secagg.scales)."""
    return (2.0 ** (secure["bits"] - 1) - 1.0) / (float(secure["total_weight"]) * value_range)


def count_to(target: float) -> Forge:
    """Moves the sum's count coordinate to ``target``: what the honest counts add up to
    (each hospital's cap, truncated to steps) is taken off, ``target`` put in."""
    def forge(vector: np.ndarray, secure: dict[str, Any]) -> np.ndarray:
        extras = secure["spec"]["extras"]
        i = len(vector) - len(extras) + extras.index("count")
        honest = sum(int(cap * _scale(secure)) for cap in CAPS.values())
        vector[i] += round(target * _scale(secure)) - honest
        return vector
    return forge


def past_the_range(vector: np.ndarray, secure: dict[str, Any]) -> np.ndarray:
    """A quarter of the modulus onto every weight coordinate: a contribution worth half the
    whole weight the sum was scaled for, times the range, far beyond its own weight."""
    tensors = len(vector) - len(secure["spec"]["extras"])
    vector[:tensors] += 2 ** (secure["bits"] - 2)
    return vector


def forging_hospital(key: Ed25519PrivateKey, forge: Forge):
    """An honest signing hospital (its real secure side) whose round-1 masked vector is
    changed by ``forge`` and signed again with its own key, as a hospital writing its own
    coordinates would send it; honest from round 2 on."""
    honest = signing_hospital(DELTA, CAPS["c"], key)

    def answer(task: str, args: list[Any], hospital: str) -> dict[str, Any] | None:
        out = honest(task, args, hospital)
        cfg = RoundConfig.decode(args[1])
        if not (task.endswith(".fit") and cfg.round == 1):
            return out
        secure = dict(cfg.secure or {})
        bits = int(secure["bits"])
        vector = unpack(out["masked"], out["coords"], bits).astype(np.int64)
        out["masked"] = pack(forge(vector, secure) % 2**bits, bits)
        out["signature"] = sign_secagg(key, hospital, cfg.run_id, cfg.round, "masked",
                                       signed_fields(out))
        return out
    return answer


def run_attacked(tmp_path, forge: Forge, **config: Any):
    keys = {h: Ed25519PrivateKey.generate() for h in CAPS}
    behaviours = {h: signing_hospital(DELTA, CAPS[h], keys[h]) for h in ("a", "b")}
    behaviours["c"] = forging_hospital(keys["c"], forge)
    clock, tracker = Clock(), FakeTracker()
    d = FakeDispatcher(clock, behaviours, live=set(behaviours))
    run = make_run(tmp_path, d, clock, tracker, hospitals=sorted(behaviours),
                   min_fit_clients=2, secure_aggregation="on", rounds=2, **config)
    run.deps.verifier = SecureAnswersVerifier({h: k.public_key() for h, k in keys.items()})
    rec = run.execute()
    weights, _ = run.store.read_checkpoint(rec)
    return rec, tracker, weights


def _refused_round_one(rec: dict[str, Any], tracker: FakeTracker, words: str) -> None:
    assert rec["status"] == "completed", rec["reason"]
    assert [a["round"] for a in rec.get("aborted_rounds", [])] == [1], rec.get("rounds")
    reason = rec["aborted_rounds"][0]["reason"]
    assert "secure fit refused" in reason and words in reason, reason
    # The hospitals whose vectors were in the refused sum are named (c among them): the
    # sum itself cannot say which one wrote its own coordinates.
    assert "a sum of the vectors of a, b, c" in reason, reason
    assert any(e["message"].startswith("round 1 aborted: secure fit refused")
               for e in rec["events"])
    # Nothing of round 1 was registered (and so signed); round 2 was, with all three.
    assert sorted(r for _, r in tracker.registry) == [2]
    assert [s["round"] for s in rec["rounds"]] == [2]
    assert rec["rounds"][0]["participants"] == CAPS


@pytest.mark.parametrize("target", [6e-05, 0.0, -400.0], ids=["tiny", "zero", "negative"])
def test_attack_secure_count_coordinate_scales_the_mean(tmp_path, target: float) -> None:
    """c moves the unmasked count from 400 to 6e-05 (the mean update 0.01 would become
    ~67,000), 0 (NaN or infinity) or -400 (the update reversed): the round is refused for
    its count, nothing is registered for it, and the honest round 2 is the only step."""
    rec, tracker, weights = run_attacked(tmp_path, count_to(target))
    _refused_round_one(rec, tracker, "unmasked count is")
    assert "declared weights add up to 400" in rec["aborted_rounds"][0]["reason"]
    np.testing.assert_allclose(weights["dense/kernel"], np.full((2, 2), DELTA), atol=1e-4)
    np.testing.assert_allclose(weights["bn/moving_mean"], np.full(2, 1 + DELTA), atol=1e-4)


def test_attack_secure_vector_past_its_range_moves_the_private_mean(tmp_path) -> None:
    """Central DP weighs every hospital 1, so the sum is scaled for the caps (400) while
    the survivors weigh 3: c's coordinates pushed by a quarter of the modulus keep the
    count right and move the mean ~67 times the range each update was clipped to. The
    mean is refused for its bound; round 2 goes on (no noise, so the step is exact)."""
    rec, tracker, weights = run_attacked(
        tmp_path, past_the_range, norm="group",
        privacy={"mode": "central", "noise_multiplier": 0.0, "clip_norm": 1.0})
    _refused_round_one(rec, tracker, "beyond the")
    assert "the mean of" in rec["aborted_rounds"][0]["reason"]
    # Each delta (0.01 on six coordinates) is inside the clip norm: the plain mean.
    np.testing.assert_allclose(weights["dense/kernel"], np.full((2, 2), DELTA), atol=1e-4)
