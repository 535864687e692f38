"""A signed "approved for serving" statement: which version an alias may serve, and since when.

Issue 26, finding 6. Every round's version carries the aggregator's model signature for
good, so a signature alone cannot tell the champion from any old or abandoned version: anyone
who can edit the registered model could point ``champion`` at one of them. An approval is a
second, separate statement the aggregator signs when an alias is promoted (``leukofed
promote``, or its watcher after a move made in the MLflow UI has passed the release gate):

    {model, version, alias, onnx_sha256, approved_by, approved_at, seq, expires_at, gate, via}

``seq`` grows with every approval the aggregator makes (its append-only promotion log numbers
them), so the inference service refuses any approval older than the newest it has seen (no
rollback to a former approval); ``expires_at`` bounds how long a copied approval stays usable
by a replica that has seen nothing yet (the aggregator renews the current one long before).
The statement is stored as the version's tag ``leukofed.approval.<alias>`` (base64 of the
signed msgpack envelope): editors can delete or copy it, never make one.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from leukofed import signing

TAG_PREFIX = "leukofed.approval."
DEFAULT_TTL_S = 7 * 24 * 3600.0  # a week; the aggregator renews at half of it
KIND = "approval"
_CLAIMS = ("model", "version", "alias", "onnx_sha256", "approved_by", "approved_at", "seq",
           "expires_at", "gate", "via")


def approval_tag(alias: str) -> str:
    """The version tag that holds the approval for ``alias``."""
    return f"{TAG_PREFIX}{alias}"


class NotApproved(RuntimeError):
    """The alias names a version without a valid approval for it (yet): not served, and asked
    again at the next poll (the aggregator's watcher may still approve or revert the move)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # unsigned | forged | replay | expired | other_version


@dataclass(frozen=True)
class Approval:
    model: str
    version: str
    alias: str
    onnx_sha256: str
    approved_by: str
    approved_at: float
    seq: int
    expires_at: float
    gate: str  # "passed" | "overridden"
    via: str  # "leukofed promote" | "watcher" | "renewal" | "revert"

    def claims(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _CLAIMS}


def _digest(model: str, version: str, alias: str, onnx_sha256: str) -> str:
    return signing.payload_digest(KIND, model, str(version), alias, onnx_sha256)


def sign_approval(key: Ed25519PrivateKey, approval: Approval) -> str:
    """The aggregator's signature over ``approval``, as text for the version tag."""
    env = signing.sign(key, kind=KIND, signer=signing.AGGREGATOR, run="",
                       round=int(approval.seq), hospital="",
                       digest=_digest(approval.model, approval.version, approval.alias,
                                      approval.onnx_sha256),
                       extra=approval.claims(), now=approval.approved_at)
    return base64.b64encode(msgpack.packb(env, use_bin_type=True)).decode("ascii")


def make_approval(key: Ed25519PrivateKey, *, model: str, version: str, alias: str,
                  onnx_sha256: str, approved_by: str, seq: int, gate: str = "passed",
                  via: str = "leukofed promote", ttl_s: float = DEFAULT_TTL_S,
                  now: float | None = None) -> tuple[Approval, str]:
    """A new approval and its signed text."""
    at = time.time() if now is None else float(now)
    approval = Approval(model, str(version), alias, onnx_sha256, approved_by[:200], at,
                        int(seq), at + float(ttl_s), gate, via)
    return approval, sign_approval(key, approval)


def read_approval(key: Ed25519PublicKey, text: str | None) -> Approval:
    """The approval ``text`` holds when the aggregator's ``key`` signed it (not yet matched
    against any version: see ``check_approval``); NotApproved otherwise."""
    if not text:
        raise NotApproved("unsigned", "no approval for serving")
    try:
        env = msgpack.unpackb(base64.b64decode(text, validate=True), raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise NotApproved("forged", "the approval is not a signature envelope") from exc
    extra = env.get("extra") if isinstance(env, Mapping) else None
    if not isinstance(extra, Mapping) or set(extra) != set(_CLAIMS) \
            or not isinstance(env.get("round"), int) or isinstance(env.get("round"), bool):
        raise NotApproved("forged", "approval envelope malformed")
    try:
        signing.verify({signing.AGGREGATOR: key}, env, kind=KIND, signer=signing.AGGREGATOR,
                       run="", round=env["round"], hospital="",
                       digest=_digest(str(extra["model"]), str(extra["version"]),
                                      str(extra["alias"]), str(extra["onnx_sha256"])))
        approval = Approval(**{k: extra[k] for k in _CLAIMS})
        if int(approval.seq) != env["round"]:
            raise ValueError("seq")
    except signing.SignatureRejected as exc:
        raise NotApproved("forged", f"approval signature does not hold: {exc.message}") from exc
    except (TypeError, ValueError) as exc:
        raise NotApproved("forged", "approval claims malformed") from exc
    return approval


def check_approval(key: Ed25519PublicKey, text: str | None, *, model: str, version: str,
                   alias: str, onnx_sha256: str, min_seq: int = 0,
                   now: float | None = None) -> Approval:
    """The approval, when it is the aggregator's, for exactly this model, version, alias and
    ONNX digest, not expired, and not older than ``min_seq`` (the newest seen); else
    NotApproved with a reason code."""
    approval = read_approval(key, text)
    if (approval.model, approval.version, approval.alias) != (model, str(version), alias):
        raise NotApproved("other_version", f"the approval is for {approval.model} version "
                          f"{approval.version} @{approval.alias}, not version {version} "
                          f"@{alias}")
    if approval.onnx_sha256 != onnx_sha256:
        raise NotApproved("other_version", "the approval names another ONNX file")
    at = time.time() if now is None else now
    if approval.expires_at <= at:
        raise NotApproved("expired", f"the approval (seq {approval.seq}) expired "
                          f"{at - approval.expires_at:.0f}s ago")
    if approval.seq < min_seq:
        raise NotApproved("replay", f"the approval (seq {approval.seq}) is older than one "
                          f"already seen (seq {min_seq}): a rollback to a former approval")
    return approval
