"""The aggregator's side of secure aggregation: four stages over Celery, each with a deadline.

1. ``keys``: every selected hospital makes two X25519 key pairs for this session and sends
   the public halves (signed);
2. ``shares``: each gets its neighbours' public keys (SecAgg+'s graph) and returns its
   Shamir shares for them, each encrypted to its recipient (the aggregator relays bytes it
   cannot open);
3. the payload task (fit or calibrate) carries each hospital's received shares; it answers
   a masked vector;
4. ``reveal``: the hospitals that sent a vector get the list of survivors and of dropped
   hospitals and reveal one share per neighbour: self-mask seeds of survivors, mask keys of
   the dropped. ``leukofed.secagg.unmask_sum`` then gives the sum.

The aggregator therefore learns the weighted *sum* of the round's vectors and the total
weight, never one hospital's vector. When fewer hospitals than needed get through a stage,
or the shares do not reach a threshold, the secure sum is aborted (``SecureAborted`` with
the reason); the round loop then skips the round without registering a model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from leukofed import secagg
from leukofed.protocol import SecAggReveal
from leukofed.signing import SignatureRejected, signed_fields
from leukofed.transport import TASK_SECAGG_KEYS, TASK_SECAGG_REVEAL, TASK_SECAGG_SHARES
from leukofed.validation import UpdateRejected, declaration

if TYPE_CHECKING:
    from services.aggregator.config import RunConfig
    from services.aggregator.gather import Gather

STAGES = ("keys", "shares", "masked", "reveal")
# The fields of each stage's answer that its signature covers (leukofed.signing.secagg_digest).
# A shares answer carries the Shamir threshold its hospital chose (services.client.secure):
# hospitals no longer take one from the aggregator, so the aggregator unmasks with theirs.
SIGNED_FIELDS = {"keys": ("purpose", "c_pk", "s_pk", "cap"),
                 "shares": ("purpose", "ciphertexts", "threshold"),
                 "masked": ("purpose", "masked", "coords"), "reveal": ("purpose", "reveals")}
# A masked vector's signature covers every field of its answer (leukofed.signing.
# signed_fields), not only those above: the fit metrics, class counts, dataset fingerprint,
# acquisition-profile and stain sums, timings and counts that ride beside it are read too
# (issue 26, finding 7: they were once added after signing).
SIGNED_WHOLE = frozenset({"masked"})
# The fields every stage's answer carries beside its signed body (services.client.secure
# SecureSessions._signed): each must equal what the signature's claims bind (hospital, run,
# round, stage), and a keys, shares or reveal answer may carry nothing else, so no field
# the aggregator could read is outside the signature (issue 26, finding 7).
BOUND_FIELDS = ("status", "hospital", "run_id", "round", "stage")


class SecureAborted(Exception):
    """The secure sum cannot complete this round; ``str()`` says why."""


@dataclass
class SecureSum:
    """What the aggregator learns: weighted sums (float64) and the sums of the extras."""

    sums: dict[str, np.ndarray]
    extras: dict[str, float]
    answers: dict[str, dict[str, Any]]  # payload answers without the masked bytes
    failures: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def auto_neighbours(n: int) -> int:
    """SecAgg+'s O(log n) degree: every other hospital up to 8, then 2 * ceil(log2 n) + 2."""
    return n - 1 if n <= 9 else min(n - 1, 2 * math.ceil(math.log2(n)) + 2)


def update_ranges(like: Mapping[str, np.ndarray], bn_names: frozenset[str],
                  update_range: float) -> dict[str, float]:
    """Per tensor, the bound of one coordinate of an update delta: ``update_range`` for
    trained weights; for BatchNorm statistics (which move by their own scale) 4x the
    current magnitude plus 100, generous because 24-bit sums still resolve 1e-5 of it."""
    return {n: (max(4.0 * float(np.max(np.abs(like[n]), initial=0.0)) + 100.0, update_range)
                if n in bn_names else update_range) for n in sorted(like)}


def moment_ranges(stats: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Bounds of BatchNorm first and second moments measured on the current global model."""
    moments = secagg.bn_moments(stats)
    return {n: 4.0 * float(np.max(np.abs(v), initial=0.0)) + 100.0
            for n, v in sorted(moments.items())}


def _hex_key(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(
        c in "0123456789abcdef" for c in value)


class SecureGather:
    """One secure sum for one round of a run (uses its gather step: send, collect, event
    log, declarations)."""

    def __init__(self, gather: Gather, cfg: RunConfig, server_round: int, purpose: str
                 ) -> None:
        assert cfg.secure_aggregation is not None
        self.traffic, self.cfg, self.round, self.purpose = gather, cfg, server_round, purpose
        self.sa = cfg.secure_aggregation
        self.run_id = gather.run_id
        self.bytes: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.answered: dict[str, list[str]] = {}

    def _params(self, hospitals: list[str]) -> dict[str, Any]:
        k = self.sa.neighbours or auto_neighbours(len(hospitals))
        return {"purpose": self.purpose, "bits": self.sa.bits, "neighbours": k,
                "threshold_fraction": self.sa.threshold}

    def _stage(self, stage: str, task: str, args_of: Mapping[str, list[Any]],
               deadline: float, body_of: Any) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Send, collect, then for each answer: the signature over the raw signed fields
        (a masked vector's: every field of its answer, SIGNED_WHOLE) first (nothing of an
        unsigned or forged answer is interpreted), then the shape
        (``body_of(hospital, body)`` returns the checked body or raises). Whatever one
        answer raises leaves that hospital out of this secure sum with the reason in the
        events; the others go on. Returns (good answers, reasons for the rest)."""
        start = time.monotonic()
        handles = self.traffic.send(task, args_of, deadline)
        answers, failures = self.traffic.collect(self.round, task, handles, deadline, 0)
        good = {}
        for h, answer in sorted(answers.items()):
            try:
                if not isinstance(answer, Mapping):
                    raise ValueError(f"the answer is a {type(answer).__name__}, not a map")
                missing = [k for k in SIGNED_FIELDS[stage] if k not in answer]
                if missing:
                    raise ValueError(f"missing {missing}")
                raw = {k: answer[k] for k in SIGNED_FIELDS[stage]}
                check = getattr(self.traffic.deps.verifier, "secagg", None)
                if check is not None:
                    check(answer.get("signature"), h, self.run_id, self.round, stage,
                          signed_fields(answer) if stage in SIGNED_WHOLE else raw)
                self._bound(h, stage, answer)
                body = body_of(h, raw)
            except SignatureRejected as exc:
                failures[h] = f"signature {exc.reason}: {exc.message}"
            except UpdateRejected as exc:  # undeclared
                failures[h] = f"{exc.reason}: {exc.message}"
            except Exception as exc:  # noqa: BLE001 - one hospital's answer, never the run
                failures[h] = f"malformed {stage} answer: {type(exc).__name__}: {exc}"
            else:
                good[h] = {**answer, **body}
                self.bytes[h] = self.bytes.get(h, 0) + _size(raw)
        for h in sorted(set(answers) - set(good)):
            self.traffic.event(f"round {self.round} secure {self.purpose} {stage}: {h} rejected "
                           f"({failures[h]})", round=self.round, hospital=h)
        self.seconds[stage] = time.monotonic() - start
        self.answered[stage] = sorted(good)
        return good, failures

    def gather(self, hospitals: list[str], task: str, blob: bytes, config: dict[str, Any],
               like: Mapping[str, np.ndarray], spec: secagg.VectorSpec, need: int,
               extra_secure: dict[str, Any] | None = None) -> SecureSum:
        params = self._params(hospitals)
        session = secagg.Session(self.run_id, self.round, self.purpose, params["bits"],
                                 params["neighbours"], params["threshold_fraction"])
        base = {"run_id": self.run_id, "round": self.round,
                "calibration_images": self.cfg.calibration_images}
        clock = self.traffic.deps.clock

        def stage_deadline() -> float:
            return clock() + self.sa.stage_deadline_s

        def abort(reason: str) -> SecureAborted:
            return SecureAborted(f"secure {self.purpose} aborted: {reason}")

        need = max(need, 2)  # a "sum" of one hospital is that hospital's vector
        # 1. public keys
        d = stage_deadline()
        keys, failures = self._stage(
            "keys", TASK_SECAGG_KEYS,
            {h: [b"", {**base, "deadline": d, "secure": params}] for h in hospitals}, d,
            self._keys_body)
        u0 = sorted(keys)
        if len(u0) < need:
            raise abort(f"{len(u0)} hospitals sent keys, {need} needed ({failures or 'none'})")
        # The graph every hospital recomputes from the members and the public seed: a
        # hospital relayed any other neighbourhood refuses to share.
        graph = secagg.neighbour_graph(u0, params["neighbours"], secagg.graph_seed(session))
        adverts = {h: {"c_pk": keys[h]["c_pk"], "s_pk": keys[h]["s_pk"], "cap": keys[h]["cap"],
                       "signature": keys[h].get("signature")} for h in u0}
        # 2. encrypted shares
        d = stage_deadline()
        shares, more = self._stage(
            "shares", TASK_SECAGG_SHARES,
            {h: [b"", {**base, "deadline": d, "secure": {
                **params, "members": u0, "adverts": {p: adverts[p] for p in (h, *graph[h])}}}]
             for h in u0},
            d, lambda h, a: self._shares_body(h, a, graph))
        failures.update(more)
        u1 = sorted(shares)
        if len(u1) < need:
            raise abort(f"{len(u1)} hospitals sent shares, {need} needed")
        total_weight = float(sum(int(keys[h]["cap"]) for h in u1))
        received = secagg.relay({h: shares[h]["ciphertexts"] for h in u1})
        # 3. the payload task answers masked vectors
        size = spec.size(like)
        deadline = float(config.get("deadline") or stage_deadline())
        masked, more = self._stage(
            "masked", task,
            {h: [blob, {**config, "secure": {
                **params, **(extra_secure or {}), "received": received[h],
                "spec": spec.to_dict(), "cap": int(keys[h]["cap"]),
                "total_weight": total_weight}}] for h in u1},
            deadline, lambda h, a: self._masked_body(a, size))
        failures.update(more)
        u2 = sorted(masked)
        if len(u2) < need:
            raise abort(f"{len(u2)} hospitals sent a masked vector, {need} needed")
        dropped = sorted(set(u1) - set(u2))
        # 4. reveal: one share per neighbour, never both kinds for one hospital
        d = stage_deadline()
        reveals, more = self._stage(
            "reveal", TASK_SECAGG_REVEAL,
            {h: [b"", {**base, "deadline": d, "secure": {
                **params, "survivors": u2, "dropped": dropped}}] for h in u2},
            d, lambda h, a: self._reveal_body(h, a, graph))
        failures.update(more)
        thresholds = {h: int(shares[h]["threshold"]) for h in u1}
        vectors = {h: secagg.unpack(masked[h]["masked"], size, params["bits"]) for h in u2}
        try:
            total = secagg.unmask_sum(
                session, vectors, {h: adverts[h] for h in u1},
                {h: sorted(received[h]) for h in u2},
                {h: r["reveals"] for h, r in reveals.items()}, thresholds)
        except (ValueError, TypeError, KeyError, IndexError, ArithmeticError) as exc:
            # SecAggError (too few shares, shares that disagree) or anything the checked
            # answers still hold: this round's secure sum ends, the run goes on.
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            raise abort(f"{message} ({len(reveals)} of {len(u2)} survivors revealed)") \
                from exc
        vector = secagg.dequantise(total, spec.coordinate_ranges(like), total_weight,
                                   params["bits"])
        sums, extras = spec.split(vector, like)
        answers = {h: {k: v for k, v in masked[h].items() if k not in ("masked", "signature")}
                   for h in u2}
        summary = {
            "protocol": "secagg+" if params["neighbours"] < len(u0) - 1 else "secagg",
            "purpose": self.purpose, "bits": params["bits"],
            "neighbours": params["neighbours"], "threshold_fraction": params["threshold_fraction"],
            "selected": sorted(hospitals), "answered": self.answered,
            "dropped_after_shares": dropped, "total_weight_bound": total_weight,
            "caps": {h: int(keys[h]["cap"]) for h in u2},
            "bytes_sent": dict(self.bytes), "seconds": dict(self.seconds),
            "clipped_coordinates": {h: int(masked[h].get("clipped_coordinates", 0))
                                    for h in u2},
        }
        return SecureSum(sums, extras, answers, failures, summary)

    def _bound(self, hospital: str, stage: str, answer: Mapping[str, Any]) -> None:
        """SignatureRejected ``forged`` when a field outside the signed body is anything but
        the value the signature's claims bind: an unsigned field added on the way to a keys,
        shares or reveal answer, or a hospital, run, round or stage that is not this one."""
        if stage not in SIGNED_WHOLE:
            unsigned = sorted(set(answer) - set(SIGNED_FIELDS[stage])
                              - {"signature", *BOUND_FIELDS})
            if unsigned:
                raise SignatureRejected("forged", f"fields outside the signature: "
                                        f"{unsigned[:5]}")
        claims = {"status": "ok", "hospital": hospital, "run_id": self.run_id,
                  "round": self.round, "stage": stage}
        wrong = sorted(k for k, v in claims.items() if k in answer and answer[k] != v)
        if wrong:
            raise SignatureRejected("forged", f"{wrong} not what the signature binds")

    # ---- answer shapes (the signed body of each stage)
    def _keys_body(self, hospital: str, body: Mapping[str, Any]) -> Mapping[str, Any]:
        if body["purpose"] != self.purpose or not (_hex_key(body["c_pk"]) and
                                                   _hex_key(body["s_pk"])):
            raise ValueError("public keys are not 32-byte hex strings for this purpose")
        cap = body["cap"]
        if isinstance(cap, bool) or not isinstance(cap, int) or not 0 < cap <= 10_000_000:
            raise ValueError(f"cap must be a positive int, got {cap!r}")
        # Without a verified declaration for this run its cap has no bound: left out.
        declared = declaration(self.traffic.declared, hospital)["train"]
        if cap > declared:  # the weight cap is its declared size
            raise ValueError(f"cap {cap} exceeds the {declared} training images declared")
        return body

    def _shares_body(self, hospital: str, body: Mapping[str, Any],
                     graph: Mapping[str, tuple[str, ...]]) -> Mapping[str, Any]:
        ct = body["ciphertexts"]
        if not isinstance(ct, Mapping) or set(ct) - set(graph[hospital]) or not all(
                isinstance(v, bytes) and len(v) < 4096 for v in ct.values()):
            raise ValueError("ciphertexts must be bytes addressed to neighbours only")
        # At least what the run asks (a hospital may ask more of its own), at most every
        # holder: anything else would not reconstruct, and is left out here instead.
        holders = len(graph[hospital]) + 1
        least = secagg.threshold_for(holders, self.sa.threshold)
        t = body["threshold"]
        if isinstance(t, bool) or not isinstance(t, int) or not least <= t <= holders:
            raise ValueError(f"threshold {t!r} outside {least}..{holders}")
        return body

    def _masked_body(self, body: Mapping[str, Any], size: int) -> Mapping[str, Any]:
        if body["coords"] != size:
            raise ValueError(f"{body['coords']!r} coordinates, expected {size}")
        width = self.sa.bits // 8  # unpacked once, when unmasking
        if not isinstance(body["masked"], bytes) or len(body["masked"]) != size * width:
            raise ValueError(f"a masked vector of {size} coordinates is {size * width} bytes")
        return body

    def _reveal_body(self, hospital: str, body: Mapping[str, Any],
                     graph: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
        """The typed reveal (leukofed.protocol.SecAggReveal): shares only of this hospital
        itself and of its neighbours, the only ones whose shares it can hold."""
        reveal = SecAggReveal.decode(dict(body))
        if reveal.purpose != self.purpose:
            raise ValueError(f"a reveal for {reveal.purpose!r}, not {self.purpose!r}")
        strangers = sorted(set(reveal.reveals) - {hospital, *graph.get(hospital, ())})
        if strangers:
            raise ValueError(f"shares of hospitals that are not its neighbours: {strangers[:3]}")
        return {"purpose": reveal.purpose,
                "reveals": {peer: list(entry) for peer, entry in reveal.reveals.items()}}


def _size(body: Mapping[str, Any]) -> int:
    """Bytes of an answer body as it crosses the broker (msgpack, as the transport packs)."""
    import msgpack

    return len(msgpack.packb(dict(body), use_bin_type=True))
