"""Secure aggregation: the aggregator learns the sum of the hospitals' vectors and nothing else.

The protocol of Bonawitz et al. (CCS 2017), with the sparse neighbour graph of SecAgg+
(Bell et al., CCS 2020). Every hospital ``i`` hides its quantised vector ``x_i`` as

    y_i = x_i + PRG(b_i) + sum_{j in N(i), i < j} PRG(s_ij) - sum_{j in N(i), j < i} PRG(s_ij)

modulo ``2**bits``, where ``s_ij`` is an X25519 key agreement between ``i`` and its neighbour
``j`` (so ``i`` and ``j`` add the same mask with opposite signs and it cancels in the sum) and
``b_i`` a random self-mask seed. Each hospital Shamir-shares ``b_i`` and its mask private key
among its neighbours, threshold ``t``. To unmask, every surviving hospital reveals, for each
neighbour, *either* its share of the neighbour's ``b`` (the neighbour sent its vector: its
self mask must go) *or* its share of the neighbour's mask key (the neighbour dropped out after
the others had masked with it: its pairwise masks must go), never both for one neighbour.
With both, the aggregator could strip every mask from one hospital's vector.

Everything here is pure (numpy and ``cryptography``, no transport): ``SecAggHospital`` is one
hospital's side, a state machine whose state is a plain dict the caller keeps on disk between
stages; ``advertise``/``share``/``masked_input``/``reveal`` make the messages and
``unmask_sum`` recovers the sum from them. The stages and their deadlines live in
``services.aggregator.secure`` (aggregator) and ``services.client.hospital`` (hospital).

Quantisation (``quantise``/``dequantise``): each coordinate ``v`` of a hospital with weight
``w`` (its example count, at most its declared cap) becomes ``round(w * clip(v, -r, r) *
scale)`` with ``scale = (2**(bits-1) - 1) / (W * r)``, where ``r`` is the coordinate's range
and ``W`` the sum of the caps of the hospitals in the round. The sum over hospitals is then
at most ``2**(bits-1) - 1`` in magnitude: it never wraps, whoever drops out. The error of
the weighted mean is below ``n_hospitals / (scale * sum(w))`` per coordinate (each value is
truncated towards zero, so the bound on the sum holds exactly),
measured by ``make bench-secagg``.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PRIME = 2**521 - 1  # a Mersenne prime above every 256-bit secret: the Shamir field
BITS = (16, 24, 32)  # supported moduli 2**bits; 24 keeps a 30-hospital sum < 2x fp16 bytes
DEFAULT_BITS = 24
DOMAIN = b"leukofed-secagg-v1"


class SecAggError(ValueError):
    """A protocol step that cannot go on; ``reason`` is a short code for the event log."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# ---------------------------------------------------------------- Shamir secret sharing


def shamir_split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` for the points ``xs`` (distinct, 1..PRIME-1) from a
    random polynomial of degree ``threshold - 1`` with ``f(0) = secret``."""
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in 1..{len(xs)} (the number of shares)")
    if len(set(xs)) != len(xs) or not all(0 < x < PRIME for x in xs):
        raise ValueError("share points must be distinct and in 1..PRIME-1")
    s = int.from_bytes(secret, "big")
    if s >= PRIME:
        raise ValueError("secret too large for the field")
    coeffs = [s] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y
    return out


def shamir_combine(shares: Mapping[int, int], threshold: int, length: int = 32) -> bytes:
    """The secret from any ``threshold`` shares (Lagrange at 0). Fewer is refused: below the
    threshold the shares say nothing about the secret, so there is nothing to compute."""
    if len(shares) < threshold:
        raise SecAggError("below_threshold",
                          f"{len(shares)} shares, {threshold} needed to reconstruct")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * length):
        raise SecAggError("bad_share", "the shares do not agree on a secret")
    return secret.to_bytes(length, "big")


# ---------------------------------------------------------------- graph and keys


def neighbour_graph(hospitals: Iterable[str], neighbours: int, seed: bytes
                    ) -> dict[str, tuple[str, ...]]:
    """SecAgg+'s sparse graph: hospitals on a ring in a seeded random order, each joined to its
    ``neighbours // 2`` nearest on either side (a Harary graph); with ``neighbours >= n - 1``
    the complete graph, i.e. the original SecAgg. Symmetric: j in N(i) iff i in N(j)."""
    order = sorted(set(hospitals), key=lambda h: hashlib.sha256(seed + h.encode()).digest())
    n = len(order)
    if neighbours >= n - 1:
        return {h: tuple(sorted(set(order) - {h})) for h in order}
    half = max(1, neighbours // 2)
    graph: dict[str, set[str]] = {h: set() for h in order}
    for i, h in enumerate(order):
        for d in range(1, half + 1):
            j = order[(i + d) % n]
            graph[h].add(j)
            graph[j].add(h)
    return {h: tuple(sorted(v)) for h, v in graph.items()}


def graph_seed(session: Session) -> bytes:
    """The seed of a session's neighbour graph: public, and made only of what the
    aggregator's signed task names (run, round, purpose), so every hospital can recompute the
    graph and check the neighbourhood it is relayed instead of taking it on trust."""
    return hashlib.sha256(f"{session.run}|{session.round}|{session.purpose}".encode()).digest()


def threshold_for(degree: int, fraction: float) -> int:
    """Shares needed to reconstruct a secret held by ``degree`` neighbours: ``fraction`` of
    them, and always more than half (else two disjoint groups of neighbours, each told a
    different story about who dropped out, could together rebuild both of a hospital's
    secrets)."""
    if not 0.5 < fraction <= 1.0:
        raise ValueError(f"threshold fraction must be in (0.5, 1], got {fraction}")
    if degree < 1:
        raise ValueError("a hospital needs at least one neighbour")
    return min(degree, max(degree // 2 + 1, math.ceil(fraction * degree - 1e-9)))


def holder_thresholds(graph: Mapping[str, Sequence[str]], fraction: float) -> dict[str, int]:
    """Each hospital's Shamir threshold as it computes it: its shares are held by its
    neighbours and by itself (``SecAggHospital.share``)."""
    return {h: threshold_for(len(peers) + 1, fraction) for h, peers in graph.items()}


def relay(ciphertexts: Mapping[str, Mapping[str, bytes]]) -> dict[str, dict[str, bytes]]:
    """What the aggregator forwards: sender -> {receiver: ciphertext} turned into receiver ->
    {sender: ciphertext}, for every hospital that sent shares."""
    return {h: {s: cts[h] for s, cts in ciphertexts.items() if s != h and h in cts}
            for h in ciphertexts}


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _kdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=DOMAIN + info
                ).derive(secret)


def agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key shared by the two ends of an X25519 pair, bound to ``info``."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise SecAggError("bad_key", f"key agreement failed: {exc}") from exc
    return _kdf(shared, info)


def prg(seed: bytes, n: int, bits: int, context: bytes) -> np.ndarray:
    """``n`` pseudo-random integers mod 2**bits from a 32-byte seed (ChaCha20 key stream):
    the same on every machine, which numpy's generators do not promise across versions."""
    key = _kdf(seed, b"prg" + context)
    stream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()
    raw = np.frombuffer(stream.update(b"\0" * (4 * n)), dtype="<u4").astype(np.uint32)
    return raw & np.uint32(_mask_of(bits))


def _mask_of(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    return (1 << bits) - 1


# ---------------------------------------------------------------- quantisation


def scales(ranges: np.ndarray, total_weight: float, bits: int) -> np.ndarray:
    """Per coordinate: integer steps per unit of weighted value, so that any sum of vectors
    whose weights add up to at most ``total_weight`` stays inside the signed range."""
    r = np.asarray(ranges, dtype=np.float64)
    if total_weight <= 0 or not np.all(r > 0):
        raise ValueError("ranges and the total weight must be positive")
    return (2.0 ** (bits - 1) - 1.0) / (float(total_weight) * r)


def quantise(values: np.ndarray, ranges: np.ndarray, weight: float, total_weight: float,
             bits: int) -> tuple[np.ndarray, int]:
    """``weight * clip(values, -ranges, ranges)`` as integers mod 2**bits (uint32), and how
    many coordinates were clipped."""
    v = np.asarray(values, dtype=np.float64)
    r = np.asarray(ranges, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise SecAggError("not_finite", "the vector to aggregate has NaN or infinite values")
    clipped = int(np.count_nonzero(np.abs(v) > r))
    # Towards zero, not to nearest: |q| never exceeds the exact value, so the sum's bound
    # holds exactly (rounding up at the edge wrapped a full-weight sum to its negative).
    q = np.trunc(weight * np.clip(v, -r, r) * scales(r, total_weight, bits)).astype(np.int64)
    return (q & _mask_of(bits)).astype(np.uint32), clipped


def dequantise(total: np.ndarray, ranges: np.ndarray, total_weight: float, bits: int
               ) -> np.ndarray:
    """The weighted sum (float64) from the unmasked sum mod 2**bits."""
    t = np.asarray(total, dtype=np.int64) & _mask_of(bits)
    signed = np.where(t >= 2 ** (bits - 1), t - 2**bits, t)
    return signed / scales(ranges, total_weight, bits)


def pack(values: np.ndarray, bits: int) -> bytes:
    """``bits // 8`` little-endian bytes per value: 24-bit values take 3 bytes, not 4."""
    v = np.asarray(values, dtype="<u4") & np.uint32(_mask_of(bits))
    width = bits // 8
    return v.view(np.uint8).reshape(-1, 4)[:, :width].tobytes()


def unpack(data: bytes, n: int, bits: int) -> np.ndarray:
    width = bits // 8
    _mask_of(bits)
    if not isinstance(data, bytes) or len(data) != n * width:
        got = len(data) if isinstance(data, bytes) else type(data).__name__
        raise SecAggError("schema", f"masked vector of {got} bytes, expected {n * width}")
    out = np.zeros((n, 4), dtype=np.uint8)
    out[:, :width] = np.frombuffer(data, dtype=np.uint8).reshape(n, width)
    return out.reshape(-1).view("<u4").astype(np.uint32)


# ---------------------------------------------------------------- one hospital's side


@dataclass(frozen=True)
class Session:
    """What every party agrees on before a secure sum: bound into every key and mask, so
    nothing from one run, round or use can be replayed into another."""

    run: str
    round: int
    purpose: str  # "fit" or "calibrate": two secure sums in one round use separate keys
    bits: int
    neighbours: int
    threshold_fraction: float

    def context(self) -> bytes:
        return f"{self.run}|{self.round}|{self.purpose}|{self.bits}".encode()


def _pair_info(session: Session, a: str, b: str, what: bytes) -> bytes:
    lo, hi = sorted((a, b))
    return what + b"|" + session.context() + f"|{lo}|{hi}".encode()


def _share_aad(session: Session, sender: str, receiver: str) -> bytes:
    return b"share|" + session.context() + f"|{sender}|{receiver}".encode()


def _sign_for(a: str, b: str) -> int:
    return 1 if a < b else -1


class SecAggHospital:
    """One hospital's side of one secure sum. ``state`` is JSON-able (hex strings): the
    caller stores it between stages (the masked-input stage can come after a worker
    restart) and it holds the only copies of this hospital's secrets for the session."""

    def __init__(self, hospital: str, session: Session, state: dict[str, Any] | None = None
                 ) -> None:
        self.hospital = hospital
        self.session = session
        self.state: dict[str, Any] = state if state is not None else {}

    # ---- stage 1: advertise two public keys
    def advertise(self) -> dict[str, str]:
        if "c_sk" not in self.state:
            c, s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
            self.state.update(c_sk=c.private_bytes_raw().hex(), s_sk=s.private_bytes_raw().hex(),
                              b=secrets.token_bytes(32).hex(), revealed={})
        return {"c_pk": public_bytes(self._key("c_sk")).hex(),
                "s_pk": public_bytes(self._key("s_sk")).hex()}

    def _key(self, name: str) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(bytes.fromhex(self.state[name]))

    # ---- stage 2: share b and s_sk with the neighbours, encrypted to each
    def share(self, adverts: Mapping[str, Mapping[str, str]], threshold: int | None = None
              ) -> dict[str, bytes]:
        """``adverts``: the public keys of this hospital's neighbours (and its own). Returns
        one ciphertext per neighbour, only that neighbour can open it. ``threshold``: the
        Shamir threshold the caller chose (services.client.secure: from the neighbourhood it
        recomputed and its own floor); by default the session's fraction of the holders."""
        if "c_sk" not in self.state:
            raise SecAggError("out_of_order", "share before advertise")
        if "adverts" in self.state:
            # Shares split a second time, to other neighbours and with a fresh polynomial,
            # would let an aggregator collect one kind from each group: both secrets.
            raise SecAggError("replay", "this session's secrets were already shared once")
        mine = self.advertise()
        if dict(adverts.get(self.hospital, {})) != mine:
            raise SecAggError("forged", "the relayed advertisement of this hospital is not its own")
        peers = sorted(set(adverts) - {self.hospital})
        if not peers:
            raise SecAggError("below_threshold", "no neighbours to share with")
        for peer in peers:  # unusable keys fail here, before anything is stored
            for key in ("c_pk", "s_pk"):
                value = adverts[peer].get(key)
                if not isinstance(value, str) or len(value) != 64:
                    raise SecAggError("bad_key", f"{peer}'s {key} is not a 32-byte hex key")
                try:
                    agree(bytes.fromhex(self.state[f"{key[0]}_sk"]), bytes.fromhex(value),
                          b"check")
                except ValueError as exc:  # bad hex; a degenerate key is a SecAggError
                    raise SecAggError("bad_key", f"{peer}'s {key}: {exc}") from exc
        holders = sorted([*peers, self.hospital])  # a hospital keeps one share itself
        t = threshold_for(len(holders), self.session.threshold_fraction)
        if threshold is not None:
            if not t <= threshold <= len(holders):
                raise SecAggError("schema", f"threshold {threshold} outside {t}..{len(holders)}"
                                  f" for {len(holders)} holders")
            t = threshold
        self.state["adverts"] = {h: dict(adverts[h]) for h in peers}
        self.state["threshold"] = t
        xs = [i + 1 for i in range(len(holders))]  # x of a share: 1 + the holder's rank
        b_shares = shamir_split(bytes.fromhex(self.state["b"]), t, xs)
        s_shares = shamir_split(bytes.fromhex(self.state["s_sk"]), t, xs)
        own = holders.index(self.hospital) + 1
        self.state["own_share"] = [str(own), format(b_shares[own], "x"),
                                   format(s_shares[own], "x")]
        out = {}
        for x, peer in zip(xs, holders, strict=True):
            if peer == self.hospital:
                continue
            key = agree(bytes.fromhex(self.state["c_sk"]), bytes.fromhex(adverts[peer]["c_pk"]),
                        _pair_info(self.session, self.hospital, peer, b"enc"))
            plain = x.to_bytes(2, "big") + b_shares[x].to_bytes(66, "big") \
                + s_shares[x].to_bytes(66, "big")
            nonce = secrets.token_bytes(12)
            out[peer] = nonce + ChaCha20Poly1305(key).encrypt(
                nonce, plain, _share_aad(self.session, self.hospital, peer))
        return out

    # ---- stage 3: the masked vector
    def masked_input(self, quantised: np.ndarray, received: Mapping[str, bytes]) -> np.ndarray:
        """Store the shares received from neighbours (sender -> ciphertext; these are the
        neighbours that completed stage 2) and mask ``quantised`` with exactly them."""
        if "adverts" not in self.state:
            raise SecAggError("out_of_order", "masked input before share")
        if "shares" in self.state:
            raise SecAggError("replay", "this session's vector was already masked once")
        shares: dict[str, list[str]] = {}
        for sender, blob in sorted(received.items()):
            if sender not in self.state["adverts"]:
                raise SecAggError("forged", f"a share from {sender!r}, not a neighbour")
            key = agree(bytes.fromhex(self.state["c_sk"]),
                        bytes.fromhex(self.state["adverts"][sender]["c_pk"]),
                        _pair_info(self.session, self.hospital, sender, b"enc"))
            try:
                plain = ChaCha20Poly1305(key).decrypt(
                    blob[:12], blob[12:], _share_aad(self.session, sender, self.hospital))
            except (InvalidTag, TypeError, ValueError) as exc:
                raise SecAggError("forged", f"the share from {sender} does not open") from exc
            x = int.from_bytes(plain[:2], "big")
            shares[sender] = [str(x), plain[2:68].hex(), plain[68:134].hex()]
        if len(shares) + 1 < self.state["threshold"]:
            raise SecAggError("below_threshold", f"{len(shares)} neighbours shared, the "
                              f"threshold is {self.state['threshold']}")
        bits = self.session.bits
        n = len(quantised)
        y = np.asarray(quantised, dtype=np.uint64) + prg(bytes.fromhex(self.state["b"]), n, bits,
                                                        b"self|" + self.session.context())
        for peer in sorted(shares):
            y += self._pairwise(peer, n) if self.hospital < peer else \
                (np.uint64(1 << bits) - self._pairwise(peer, n))
        # Stored only now: a vector that could not be masked leaves the session as it was.
        self.state["shares"] = {**shares, self.hospital: self.state["own_share"]}
        return (y & np.uint64(_mask_of(bits))).astype(np.uint32)

    def _pairwise(self, peer: str, n: int) -> np.ndarray:
        seed = agree(bytes.fromhex(self.state["s_sk"]),
                     bytes.fromhex(self.state["adverts"][peer]["s_pk"]),
                     _pair_info(self.session, self.hospital, peer, b"mask"))
        return prg(seed, n, self.session.bits, b"pair|" + self.session.context()).astype(
            np.uint64)

    # ---- stage 4: reveal shares
    def reveal(self, survivors: Sequence[str], dropped: Sequence[str]) -> dict[str, list[str]]:
        """For each neighbour whose share this hospital holds: the share of its self-mask
        seed ``b`` if it is among ``survivors``, of its mask key if among ``dropped``. A
        request that contradicts an earlier one for this session (a survivor now called
        dropped, or the reverse) is refused: with both shares the aggregator could unmask one
        hospital's vector."""
        if "shares" not in self.state:
            raise SecAggError("out_of_order", "reveal before masked input")
        alive, gone = set(survivors), set(dropped)
        if alive & gone:
            raise SecAggError("forged", f"{sorted(alive & gone)} both survived and dropped")
        if self.hospital not in alive:
            raise SecAggError("forged", "asked to reveal while listed as not surviving")
        if len(alive) < self.state["threshold"]:
            raise SecAggError("below_threshold", f"{len(alive)} survivors, the threshold is "
                              f"{self.state['threshold']}")
        revealed: dict[str, str] = self.state["revealed"]
        out: dict[str, list[str]] = {}
        for peer, (x, b_share, s_share) in sorted(self.state["shares"].items()):
            kind = "b" if peer in alive else "s" if peer in gone else None
            if kind is None:
                continue
            if revealed.get(peer, kind) != kind:
                raise SecAggError("refused", f"{peer}'s other share was already revealed: "
                                  "revealing both would unmask its vector")
            out[peer] = [kind, x, b_share if kind == "b" else s_share]
        revealed.update({peer: entry[0] for peer, entry in out.items()})  # all or nothing
        return out


# ---------------------------------------------------------------- the aggregator's side


def unmask_sum(session: Session, masked: Mapping[str, np.ndarray],
               adverts: Mapping[str, Mapping[str, str]],
               masked_with: Mapping[str, Sequence[str]],
               reveals: Mapping[str, Mapping[str, Sequence[str]]], thresholds: Mapping[str, int]
               ) -> np.ndarray:
    """The sum of the survivors' quantised vectors (mod 2**bits).

    ``masked``: survivor -> masked vector; ``masked_with``: survivor -> the neighbours it
    masked with (those whose shares it received); ``reveals``: revealing hospital -> {peer:
    [kind, x, share]} (a survivor's reveal includes its own share of its own seed);
    ``thresholds``: hospital -> its Shamir threshold (over its neighbours and itself). Raises
    SecAggError (``below_threshold``) when a needed secret has too few shares."""
    bits = session.bits
    survivors = sorted(masked)
    if not survivors:
        raise SecAggError("below_threshold", "no masked vectors")
    n = len(masked[survivors[0]])
    total = np.zeros(n, dtype=np.uint64)
    for h in survivors:
        total += masked[h].astype(np.uint64)

    def shares_of(peer: str, kind: str) -> dict[int, int]:
        found = {}
        for rev in reveals.values():
            entry = rev.get(peer)
            if entry is not None and entry[0] == kind:
                found[int(entry[1])] = int(entry[2], 16)
        return found

    for h in survivors:  # remove the self masks
        b = shamir_combine(shares_of(h, "b"), thresholds[h])
        total += np.uint64(1 << bits) - prg(b, n, bits, b"self|" + session.context()
                                            ).astype(np.uint64)
    dropped = sorted({p for h in survivors for p in masked_with[h]} - set(survivors))
    for d in dropped:  # remove the pairwise masks survivors added with a hospital that left
        s_sk = shamir_combine(shares_of(d, "s"), thresholds[d])
        for h in survivors:
            if d not in masked_with[h]:
                continue
            seed = agree(s_sk, bytes.fromhex(adverts[h]["s_pk"]), _pair_info(session, d, h,
                                                                             b"mask"))
            mask = prg(seed, n, bits, b"pair|" + session.context()).astype(np.uint64)
            # h added +mask if h < d, else -mask: take away what it added.
            total += (np.uint64(1 << bits) - mask) if h < d else mask
    return (total & np.uint64(_mask_of(bits))).astype(np.uint32)


# ---------------------------------------------------------------- what is summed


@dataclass(frozen=True)
class VectorSpec:
    """The layout of a summed vector, sent by the aggregator so both sides agree: the named
    tensors in this order (shapes from the global weights both hold), each with its range,
    then scalar ``extras`` of range 1 (``count``: 1 per hospital, so the weighted sum of it
    is the total weight; ``unclipped``: 1 if the hospital's update needed no clipping)."""

    names: tuple[str, ...]
    ranges: tuple[float, ...]
    extras: tuple[str, ...] = ("count",)

    def __post_init__(self) -> None:
        if len(self.names) != len(self.ranges) or not self.names:
            raise SecAggError("schema", "a vector spec needs one range per tensor name")
        if not all(isinstance(r, float | int) and math.isfinite(r) and r > 0
                   for r in self.ranges):
            raise SecAggError("schema", "ranges must be positive finite numbers")
        if set(self.extras) - {"count", "unclipped"} or "count" not in self.extras:
            raise SecAggError("schema", f"unknown extras {self.extras}")

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "ranges": [float(r) for r in self.ranges],
                "extras": list(self.extras)}

    @classmethod
    def from_dict(cls, data: Any) -> VectorSpec:
        try:
            return cls(tuple(str(n) for n in data["names"]),
                       tuple(float(r) for r in data["ranges"]),
                       tuple(str(e) for e in data["extras"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggError("schema", f"malformed vector spec: {exc}") from exc

    def _shapes(self, like: Mapping[str, np.ndarray]) -> list[int]:
        missing = [n for n in self.names if n not in like]
        if missing:
            raise SecAggError("schema", f"tensors {missing[:3]} are not in the model")
        return [int(np.asarray(like[n]).size) for n in self.names]

    def size(self, like: Mapping[str, np.ndarray]) -> int:
        return sum(self._shapes(like)) + len(self.extras)

    def coordinate_ranges(self, like: Mapping[str, np.ndarray]) -> np.ndarray:
        sizes = self._shapes(like)
        return np.concatenate([np.full(s, r, np.float64)
                               for s, r in zip(sizes, self.ranges, strict=True)]
                              + [np.ones(len(self.extras))])

    def flatten(self, tensors: Mapping[str, np.ndarray], extras: Mapping[str, float]
                ) -> np.ndarray:
        return np.concatenate([np.asarray(tensors[n], np.float64).ravel() for n in self.names]
                              + [np.asarray([float(extras[e]) for e in self.extras])])

    def split(self, vector: np.ndarray, like: Mapping[str, np.ndarray]
              ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        out, i = {}, 0
        for name, size in zip(self.names, self._shapes(like), strict=True):
            out[name] = np.asarray(vector[i:i + size]).reshape(np.asarray(like[name]).shape)
            i += size
        return out, {e: float(vector[i + k]) for k, e in enumerate(self.extras)}


def bn_moments(stats: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """BatchNorm statistics as first and second moments (``moving_variance`` becomes
    ``var + mean**2``), which sum across hospitals: the exact pooling of
    ``leukofed.strategies.pool_batchnorm_stats`` as a weighted sum."""
    out = {}
    for name, value in stats.items():
        v = np.asarray(value, np.float64)
        mean_name = name[: -len("moving_variance")] + "moving_mean"
        if name.endswith("moving_variance") and mean_name in stats:
            v = v + np.asarray(stats[mean_name], np.float64) ** 2
        out[name] = v
    return out


def bn_from_moments(moments: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of ``bn_moments`` on pooled (weighted-mean) moments."""
    out = {}
    for name, value in moments.items():
        mean_name = name[: -len("moving_variance")] + "moving_mean"
        if name.endswith("moving_variance") and mean_name in moments:
            value = np.maximum(value - np.asarray(moments[mean_name]) ** 2, 0.0)
        out[name] = np.asarray(value, np.float64)
    return out
