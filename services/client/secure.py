"""One hospital's side of secure aggregation (leukofed.secagg) over the Celery tasks.

The hospital's secrets for a session (its two X25519 private keys and its self-mask seed)
live only in this worker's memory: never on disk, never on the broker. A worker that
restarts mid-round has lost them and counts as dropped, which the protocol survives.

Each answer is signed (kind ``secagg``, bound to run, round and stage). With
``peer_public_keys_dir`` set, a hospital also checks that each neighbour's relayed public
keys carry that neighbour's signature, so an aggregator cannot slip in keys of its own
(without it, secure aggregation holds against an aggregator that follows the protocol but
reads everything it sees: docs/security.md).

What a hospital does not take from the aggregator (issue 26, finding 3):

* its neighbourhood: recomputed from the session's public graph seed and the members list,
  and refused when the relayed one differs or has fewer than ``min_neighbours`` (an
  aggregator relaying {victim, colluder} made the threshold 2 and unmasked the victim);
* its Shamir threshold: computed here over that neighbourhood with at least
  ``min_threshold`` of it, and reported (signed) to the aggregator, which must use it;
* a second masked vector for one (run, round, purpose, global weights): refused, because
  the same weights and seed give the same update, so two sums over different groups
  would give it away by difference. Remembered for the worker's life, and across restarts
  through the participation log (``spent_keys``).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from leukofed import secagg, signing
from leukofed.protocol import RoundConfig

log = logging.getLogger(__name__)
KEEP_SESSIONS = 8  # the fit and calibrate sessions of a few rounds; older ones are forgotten
# Below two neighbours, one colluding hospital holds every share but the hospital's own.
MIN_NEIGHBOURS = 2
MIN_THRESHOLD = 0.6  # the run config's default fraction: an honest default run is unchanged
# (run, round, purpose, SHA-256 of the global weights): one masked vector each.
VectorKey = tuple[str, int, str, str]


def session_of(cfg: RoundConfig) -> secagg.Session:
    """The session a task belongs to, from its round config's ``secure`` entry."""
    secure = cfg.secure
    if not isinstance(secure, Mapping):
        raise secagg.SecAggError("schema", "no secure-aggregation parameters in the task")
    try:
        session = secagg.Session(run=cfg.run_id, round=cfg.round,
                                 purpose=str(secure["purpose"]), bits=int(secure["bits"]),
                                 neighbours=int(secure["neighbours"]),
                                 threshold_fraction=float(secure["threshold_fraction"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise secagg.SecAggError("schema", f"malformed secure parameters: {exc}") from exc
    if session.purpose not in ("fit", "calibrate") or session.bits not in secagg.BITS:
        raise secagg.SecAggError("schema", f"purpose {session.purpose!r} or bits "
                                 f"{session.bits} not supported")
    try:
        secagg.threshold_for(2, session.threshold_fraction)  # validates the fraction
    except ValueError as exc:
        raise secagg.SecAggError("schema", str(exc)) from exc
    return session


def update_to_sum(secure: Mapping[str, Any], global_weights: Mapping[str, np.ndarray],
                  local_weights: Mapping[str, np.ndarray], num_examples: int
                  ) -> tuple[dict[str, np.ndarray], float, dict[str, float]]:
    """What a hospital adds to the secure sum: (delta tensors, weight, extras).

    Plain: ``local - global`` weighted by the example count, clipped first to the L2 norm
    ``update_clip_norm`` when the run sets one (the per-update norm bound that the
    aggregator can no longer check on a masked vector). Central DP: clipped to
    ``dp_clip_norm``, weight 1, and whether it needed clipping (adaptive clipping)."""
    from leukofed.privacy import clipped_delta

    dp_clip = secure.get("dp_clip_norm")
    if dp_clip:
        delta, norm = clipped_delta(global_weights, local_weights, float(dp_clip))
        return delta, 1.0, {"count": 1.0, "unclipped": float(norm <= float(dp_clip))}
    clip = secure.get("update_clip_norm")
    if clip:
        delta, _ = clipped_delta(global_weights, local_weights, float(clip))
    else:
        delta = {k: np.asarray(local_weights[k], np.float64) - global_weights[k]
                 for k in global_weights if k in local_weights}
    return delta, float(num_examples), {"count": 1.0}


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over named tensors, for callers that hold arrays rather than the task's
    blob (the worker uses the blob's own SHA-256)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        value = np.ascontiguousarray(weights[name])
        h.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def spent_keys(entries: Iterable[Mapping[str, Any]]) -> set[VectorKey]:
    """The vector keys of the masked vectors a participation log records as sent, so a
    restarted worker still refuses a second vector for them."""
    out = set()
    for e in entries:
        if e.get("secure") and e.get("status") == "ok" and e.get("global_sha256"):
            out.add((str(e.get("run")), int(e.get("round") or 0),
                     str(e.get("purpose") or e.get("task")), str(e["global_sha256"])))
    return out


class SecureSessions:
    def __init__(self, hospital: str, signing_key: Any = None,
                 peer_keys: Mapping[str, Any] | None = None,
                 min_neighbours: int = MIN_NEIGHBOURS, min_threshold: float = MIN_THRESHOLD,
                 spent: Iterable[VectorKey] = ()) -> None:
        secagg.threshold_for(2, min_threshold)  # (0.5, 1]: a majority, as for the sessions
        if min_neighbours < 1:
            raise ValueError("min_neighbours must be at least 1")
        self.hospital = hospital
        self.signing_key = signing_key
        self.peer_keys = dict(peer_keys or {})
        self.min_neighbours = int(min_neighbours)
        self.min_threshold = float(min_threshold)
        self._parties: OrderedDict[secagg.Session, secagg.SecAggHospital] = OrderedDict()
        # Never evicted with the sessions: forgetting a key would allow a second vector.
        self._spent: set[VectorKey] = set(spent)

    def _party(self, session: secagg.Session, create: bool = False) -> secagg.SecAggHospital:
        party = self._parties.get(session)
        if party is None:
            if not create:
                raise secagg.SecAggError("out_of_order", "no keys for this session here "
                                         "(a restarted worker, or a stage out of order)")
            party = self._parties[session] = secagg.SecAggHospital(self.hospital, session)
            while len(self._parties) > KEEP_SESSIONS:
                self._parties.popitem(last=False)
        return party

    def _signed(self, session: secagg.Session, stage: str, body: dict[str, Any]
                ) -> dict[str, Any]:
        answer = {"status": "ok", "hospital": self.hospital, "run_id": session.run,
                  "round": session.round, "stage": stage, **body}
        if self.signing_key is not None:
            answer["signature"] = signing.sign_secagg(self.signing_key, self.hospital,
                                                      session.run, session.round, stage, body)
        return answer

    # ---- the three stages of their own
    def keys(self, cfg: RoundConfig, cap: int) -> dict[str, Any]:
        session = session_of(cfg)
        adverts = self._party(session, create=True).advertise()
        return self._signed(session, "keys", {"purpose": session.purpose, **adverts,
                                              "cap": int(cap)})

    def neighbourhood(self, session: secagg.Session, members: Any) -> tuple[str, ...]:
        """This hospital's neighbours as the session's public seed places them among
        ``members`` (the hospitals that sent keys), refused below ``min_neighbours``."""
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members) \
                or len(set(members)) != len(members) or self.hospital not in members:
            raise secagg.SecAggError("schema", "members must list distinct hospital ids, "
                                     "this one among them")
        mine = secagg.neighbour_graph(members, session.neighbours,
                                      secagg.graph_seed(session))[self.hospital]
        if len(mine) < self.min_neighbours:
            raise secagg.SecAggError("below_minimum", f"{len(mine)} neighbours, this hospital "
                                     f"shares its secrets with at least {self.min_neighbours}")
        return mine

    def shares(self, cfg: RoundConfig) -> dict[str, Any]:
        session = session_of(cfg)
        adverts = cfg.secure.get("adverts")
        if not isinstance(adverts, Mapping):
            raise secagg.SecAggError("schema", "no neighbour keys in the task")
        expected = self.neighbourhood(session, cfg.secure.get("members"))
        relayed = sorted(str(p) for p in adverts if p != self.hospital)
        if relayed != sorted(expected):
            # The aggregator chose whom this hospital shares with: refused before anything
            # is checked or stored, so the genuine neighbourhood still works afterwards.
            raise secagg.SecAggError("neighbourhood", f"relayed neighbours {relayed[:5]} are "
                                     f"not the seed's {sorted(expected)[:5]}")
        threshold = secagg.threshold_for(len(expected) + 1, max(session.threshold_fraction,
                                                                self.min_threshold))
        plain = {}
        for peer, advert in adverts.items():
            if not isinstance(advert, Mapping):
                raise secagg.SecAggError("schema", f"malformed keys of {peer!r}")
            body = {"purpose": session.purpose, "c_pk": advert.get("c_pk"),
                    "s_pk": advert.get("s_pk"), "cap": advert.get("cap")}
            if self.peer_keys and peer != self.hospital:
                try:
                    signing.verify_secagg(self.peer_keys, advert.get("signature"), str(peer),
                                          session.run, session.round, "keys", body)
                except signing.SignatureRejected as exc:
                    raise secagg.SecAggError("forged", f"the keys relayed for {peer} are not "
                                             f"signed by {peer}: {exc.message}") from exc
            plain[str(peer)] = {"c_pk": body["c_pk"], "s_pk": body["s_pk"]}
        ciphertexts = self._party(session).share(plain, threshold)
        # The threshold is signed with the shares: the aggregator unmasks with this one.
        return self._signed(session, "shares", {"purpose": session.purpose,
                                                "ciphertexts": ciphertexts,
                                                "threshold": threshold})

    def reveal(self, cfg: RoundConfig) -> dict[str, Any]:
        session = session_of(cfg)
        secure = cfg.secure
        survivors, dropped = secure.get("survivors"), secure.get("dropped")
        if not isinstance(survivors, list) or not isinstance(dropped, list):
            raise secagg.SecAggError("schema", "survivors and dropped must be lists")
        reveals = self._party(session).reveal([str(h) for h in survivors],
                                              [str(h) for h in dropped])
        log.info("secure aggregation %s round %s: revealed %d self-mask and %d key shares",
                 session.purpose, session.round,
                 sum(k == "b" for k, _, _ in reveals.values()),
                 sum(k == "s" for k, _, _ in reveals.values()))
        return self._signed(session, "reveal", {"purpose": session.purpose,
                                                "reveals": reveals})

    # ---- the masked vector, made inside the fit or calibrate task
    def vector_key(self, cfg: RoundConfig, global_sha256: str) -> VectorKey:
        session = session_of(cfg)
        return (session.run, session.round, session.purpose, global_sha256)

    def refuse_second_vector(self, cfg: RoundConfig, global_sha256: str) -> None:
        """SecAggError ``replay`` when a masked vector already left for this run, round,
        purpose and global weights, whatever other session parameters the task names (a
        new threshold or degree would otherwise open a new session): the worker calls it
        before training, so a refused task costs nothing."""
        if self.vector_key(cfg, global_sha256) in self._spent:
            raise secagg.SecAggError("replay", "a masked vector for this run, round, purpose "
                                     "and global weights was already sent")

    def masked(self, cfg: RoundConfig, like: Mapping[str, np.ndarray],
               tensors: Mapping[str, np.ndarray], weight: float, extras: Mapping[str, float],
               global_sha256: str | None = None, sign: bool = True) -> dict[str, Any]:
        """The answer of a masked vector: ``weight * tensors`` (clipped to the spec's ranges)
        plus the extras, quantised and masked. ``global_sha256``: the global weights the
        task carried (default: a digest of ``like``); one vector per key. Signed whole
        (``sign_masked``) unless ``sign`` is off: a caller that adds fields to the answer
        (the worker's metrics, class counts, profile sums, timings) signs it after them."""
        session = session_of(cfg)
        key = self.vector_key(cfg, global_sha256 or weights_digest(like))
        self.refuse_second_vector(cfg, key[3])
        secure = cfg.secure
        spec = secagg.VectorSpec.from_dict(secure.get("spec"))
        cap, total = secure.get("cap"), secure.get("total_weight")
        received = secure.get("received")
        if not isinstance(received, Mapping) or not all(isinstance(v, bytes)
                                                        for v in received.values()):
            raise secagg.SecAggError("schema", "received shares must be bytes")
        if not isinstance(cap, int | float) or not isinstance(total, int | float) \
                or not 0 < cap <= total:
            raise secagg.SecAggError("schema", f"cap {cap!r} / total weight {total!r} unusable")
        w = min(float(weight), float(cap))  # never more than declared: the sum cannot wrap
        vector = spec.flatten(tensors, extras)
        q, clipped = secagg.quantise(vector, spec.coordinate_ranges(like), w, float(total),
                                     session.bits)
        masked = self._party(session).masked_input(q, received)
        self._spent.add(key)  # only now: a vector that could not be masked never left
        answer = {"status": "ok", "hospital": self.hospital, "run_id": session.run,
                  "round": session.round, "stage": "masked", "purpose": session.purpose,
                  "masked": secagg.pack(masked, session.bits), "coords": int(len(q)),
                  "clipped_coordinates": int(clipped)}
        return self.sign_masked(cfg, answer) if sign else answer

    def sign_masked(self, cfg: RoundConfig, answer: dict[str, Any]) -> dict[str, Any]:
        """Sign a masked-vector answer over every field it carries (leukofed.signing.
        signed_fields): the vector and all that rides beside it, so nothing of it can be
        added or changed afterwards (issue 26, finding 7). Call it once, after the last
        field is set; unsigned without a key (development mode)."""
        session = session_of(cfg)
        if self.signing_key is not None:
            answer["signature"] = signing.sign_secagg(
                self.signing_key, self.hospital, session.run, session.round, "masked",
                signing.signed_fields(answer))
        return answer
