"""Ed25519 signatures on what crosses the broker (tasks and answers) and on registered
models (what the inference service serves).

Why: the broker is shared by every hospital, so anyone who can write to it (a compromised
hospital, a stolen broker password, the broker operator) could otherwise inject an update
into the aggregate or make a hospital train on a model of their choosing. With signatures

* each hospital signs its update with its own private key; the aggregator holds every
  hospital's public key and aggregates only updates signed by the hospital it asked;
* the aggregator signs every task; a hospital runs only tasks signed by the aggregator's key.

A signature covers a canonical msgpack document of *claims* (see ``_message``): the kind of
message, the run, the round, the hospital, a random nonce, the time of signing and the
SHA-256 of the payload (the weight blob, plus the config for a task). The verifier checks the
signature first, then that every claim matches what it expects. That binding is what stops
replays: an update signed for round 3 is rejected in round 4 even though its signature is
valid, and a second message with a nonce already seen is rejected too.

Keys are files: ``<name>.key`` (PKCS#8 PEM, mode 0600, stays where it was made) and
``<name>.pub`` (SubjectPublicKeyInfo PEM, handed to the other side).
``python -m leukofed.signing generate --out DIR NAME...`` makes them.

Rejection reasons (``SignatureRejected.reason``) are short codes that go into the run's event
log: ``unsigned``, ``unknown_key``, ``forged`` (bad signature, or a payload that does not
match the signed digest, or claims about another hospital), ``replay`` (another run or
round, or a nonce seen before), ``expired`` (a task past its validity).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import os
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

ALG = "ed25519"
DOMAIN = "leukofed-sig-v1"  # a signature for this protocol can never be valid for another
# update: a fit answer; calibration, head statistics, evaluation, describe: the other
# answers (a signature of one kind is never valid as another); secagg: the
# secure-aggregation stages; model: a registered version's ONNX file, signed by the
# aggregator for the inference service; approval: the aggregator's "approved for serving"
# statement on an alias (leukofed.approval); status: a hospital's declined or error answer
# (why it did not carry a task out). "head statistics" was missing here, so a hospital
# with a key failed every head-statistics task (the answer could not be signed).
KINDS = ("update", "task", "secagg", "calibration", "head statistics", "evaluation",
         "describe", "status", "model", "approval")
REASONS = ("unsigned", "unknown_key", "forged", "replay", "expired")
_ENVELOPE_FIELDS = {"alg", "kind", "signer", "run", "round", "hospital", "nonce", "signed_at",
                    "digest", "extra", "sig"}


class SignatureRejected(ValueError):
    """A message whose signature does not hold; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# ---------------------------------------------------------------- keys


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only from the moment it exists.

    A temporary file is created 0600 beside ``path`` (mkstemp), written, then renamed over
    ``path``: a chmod after writing would leave a readable window, and the mode of
    ``os.open`` does not apply to a file that already exists with a wider one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def private_dir(path: Path) -> Path:
    """A folder only its owner can enter (0700), also when it already existed wider."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def generate_keypair(out_dir: Path, name: str, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``<name>.key`` (private, 0600) and ``<name>.pub`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    if not overwrite and (key_path.exists() or pub_path.exists()):
        raise FileExistsError(f"{key_path} or {pub_path} exists; pass overwrite to rotate")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_private(key_path, pem)
    pub_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def load_public_keys(directory: Path) -> dict[str, Ed25519PublicKey]:
    """Every ``<name>.pub`` in ``directory``, by name (the hospital id)."""
    return {p.stem: load_public_key(p) for p in sorted(Path(directory).glob("*.pub"))}


# ---------------------------------------------------------------- digests


def _canonical(value: Any) -> Any:
    """Maps with sorted keys, so both sides pack the same bytes whatever the dict order."""
    if isinstance(value, Mapping):
        return [[k, _canonical(value[k])] for k in sorted(value)]
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def payload_digest(*parts: Any) -> str:
    """SHA-256 over a canonical msgpack of ``parts`` (bytes, dicts, numbers, strings)."""
    return hashlib.sha256(msgpack.packb(_canonical(list(parts)), use_bin_type=True)).hexdigest()


def _message(env: Mapping[str, Any]) -> bytes:
    claims = [DOMAIN, env["alg"], env["kind"], env["signer"], env["run"], env["round"],
              env["hospital"], env["nonce"], env["signed_at"], env["digest"],
              _canonical(env["extra"])]
    return msgpack.packb(claims, use_bin_type=True)


# ---------------------------------------------------------------- sign


def sign(key: Ed25519PrivateKey, *, kind: str, signer: str, run: str, round: int,
         hospital: str, digest: str, extra: Mapping[str, Any] | None = None,
         now: float | None = None) -> dict[str, Any]:
    """A signed envelope (a plain dict that crosses msgpack) over the given claims."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    env: dict[str, Any] = {
        "alg": ALG, "kind": kind, "signer": signer, "run": str(run), "round": int(round),
        "hospital": hospital, "nonce": secrets.token_hex(16),
        "signed_at": float(time.time() if now is None else now), "digest": digest,
        "extra": dict(extra or {}),
    }
    env["sig"] = key.sign(_message(env))
    return env


# ---------------------------------------------------------------- verify


class NonceCache:
    """Nonces seen recently (bounded, thread-safe): a message delivered twice is a replay."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, nonce: str) -> bool:
        """True if new; False if seen before."""
        with self._lock:
            if nonce in self._seen:
                return False
            self._seen[nonce] = None
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
            return True


def verify(keys: Mapping[str, Ed25519PublicKey], envelope: Any, *, kind: str, signer: str,
           run: str, round: int, hospital: str, digest: str,
           nonces: NonceCache | None = None, max_age_s: float | None = None,
           now: float | None = None) -> dict[str, Any]:
    """Check ``envelope`` was signed by ``signer``'s key over exactly these claims; raise
    SignatureRejected with a reason code otherwise. Returns the envelope's ``extra``."""
    if envelope is None:
        raise SignatureRejected("unsigned", "no signature")
    if not isinstance(envelope, Mapping) or set(envelope) != _ENVELOPE_FIELDS:
        raise SignatureRejected("unsigned", "signature envelope malformed")
    if envelope["alg"] != ALG:
        raise SignatureRejected("forged", f"algorithm {envelope['alg']!r} is not {ALG}")
    key = keys.get(signer)
    if key is None:
        raise SignatureRejected("unknown_key", f"no public key for {signer!r}")
    sig = envelope["sig"]
    try:
        if not isinstance(sig, bytes):
            raise InvalidSignature()
        key.verify(sig, _message(envelope))
    except (InvalidSignature, KeyError, TypeError, ValueError) as exc:
        raise SignatureRejected("forged", f"signature does not verify with {signer}'s key") \
            from exc
    # The signature holds: now every claim must be the one expected here.
    if envelope["kind"] != kind or envelope["signer"] != signer:
        raise SignatureRejected("forged", f"signed as a {envelope['kind']} by "
                                f"{envelope['signer']!r}, expected a {kind} by {signer!r}")
    if envelope["hospital"] != hospital:
        raise SignatureRejected("forged", f"signed for hospital {envelope['hospital']!r}, "
                                          f"not {hospital!r}")
    if envelope["run"] != str(run) or envelope["round"] != int(round):
        raise SignatureRejected("replay", f"signed for run {envelope['run']!r} round "
                                          f"{envelope['round']}, this is run {run!r} round {round}")
    if envelope["digest"] != digest:
        raise SignatureRejected("forged", "payload does not match the signed digest")
    if max_age_s is not None:
        age = (time.time() if now is None else now) - float(envelope["signed_at"])
        if age > max_age_s:
            raise SignatureRejected("expired", f"signed {age:.0f}s ago, valid {max_age_s:.0f}s")
    if nonces is not None and not nonces.add(str(envelope["nonce"])):
        raise SignatureRejected("replay", f"nonce {envelope['nonce']} seen before")
    return dict(envelope["extra"])


# ---------------------------------------------------------------- the two messages

AGGREGATOR = "aggregator"  # the signer name of tasks (its public key file: aggregator.pub)


def blob_digest(blob: bytes) -> str:
    """SHA-256 of the global weights a task carried: an answer's signature names them, so
    an answer to another model (an old task, another run's) is never taken for this one."""
    return hashlib.sha256(blob).hexdigest()


def signed_fields(answer: Mapping[str, Any], *apart: str) -> dict[str, Any]:
    """Every field of ``answer`` but its signature and ``apart`` (hashed on their own): what
    an answer carries beside its payload (a fit answer's metrics, timings, class counts,
    dataset fingerprint, acquisition-profile and stain sums, byte count; a calibration's
    byte count, digest and seconds; an evaluation's seconds; the status, hospital, run id
    and round of every answer), all of it under the signature. Issue 26, finding 7: those
    fields were once added or changeable after signing, and the acquisition profile becomes
    the served model's refer check."""
    return {k: v for k, v in answer.items() if k != "signature" and k not in apart}


def answer_body(kind: str, answer: Mapping[str, Any]) -> Any:
    """What an answer's signature covers, besides run, round and hospital: every field the
    answer carries (``signed_fields``), whatever its kind. An update's and a calibration's
    or head statistics' weight bytes and example count are hashed apart (they must be
    there); the rest of a fit, calibration, head-statistics, evaluation (splits, membership
    histograms, seconds) or describe answer (the declaration and its nonce) is hashed
    whole, so a field added, dropped or changed after signing makes it ``forged``."""
    if kind in ("update", "calibration", "head statistics"):
        blob, n = answer.get("weights"), answer.get("num_examples")
        if not isinstance(blob, bytes) or isinstance(n, bool) or not isinstance(n, int):
            raise SignatureRejected("forged", "answer has no weight bytes or example count")
        if kind == "update":
            return update_digest(blob, n, signed_fields(answer, "weights", "num_examples"))
        return payload_digest(kind, blob, n, signed_fields(answer, "weights", "num_examples"))
    if kind in ("evaluation", "describe", "status"):
        return payload_digest(kind, signed_fields(answer))
    raise ValueError(f"no answer of kind {kind!r}")


def sign_answer(key: Ed25519PrivateKey, kind: str, hospital: str, run: str, round: int,
                answer: Mapping[str, Any], global_digest: str = "", task_id: str = ""
                ) -> dict[str, Any]:
    """A hospital's signature over one answer, bound to the task it answers (its Celery id)
    and to the global weights it was computed on."""
    return sign(key, kind=kind, signer=hospital, run=run, round=round, hospital=hospital,
                digest=answer_body(kind, answer),
                extra={"global": global_digest, "task": task_id})


def verify_answer(keys: Mapping[str, Ed25519PublicKey], answer: Mapping[str, Any], kind: str,
                  hospital: str, run: str, round: int, global_digest: str | None = None,
                  task_id: str | None = None, nonces: NonceCache | None = None) -> None:
    """Check ``answer`` carries ``hospital``'s signature of this kind over exactly its
    content, for this run and round, and (when given) for this task and these weights."""
    extra = verify(keys, answer.get("signature"), kind=kind, signer=hospital, run=run,
                   round=round, hospital=hospital, digest=answer_body(kind, answer),
                   nonces=nonces)
    if global_digest is not None and extra.get("global") != global_digest:
        raise SignatureRejected("replay", "signed for other global weights than this task's")
    if task_id is not None and extra.get("task") != task_id:
        raise SignatureRejected("replay", f"signed for task {extra.get('task')!r}, "
                                f"not {task_id!r}")


def update_digest(blob: bytes, num_examples: int, side: Mapping[str, Any] | None = None
                  ) -> str:
    """What a hospital's signature covers besides run/round/hospital: the exact weight bytes,
    the example count (it sets the update's weight in FedAvg, so it must not be altered) and
    ``side``, every other field of the answer (``signed_fields``), canonically encoded."""
    return payload_digest("update", blob, int(num_examples), dict(side or {}))


def sign_update(key: Ed25519PrivateKey, hospital: str, run: str, round: int, blob: bytes,
                num_examples: int, global_digest: str = "", task_id: str = ""
                ) -> dict[str, Any]:
    return sign_answer(key, "update", hospital, run, round,
                       {"weights": blob, "num_examples": num_examples}, global_digest, task_id)


def verify_update(keys: Mapping[str, Ed25519PublicKey], answer: Mapping[str, Any], hospital: str,
                  run: str, round: int, nonces: NonceCache | None = None,
                  global_digest: str | None = None, task_id: str | None = None) -> None:
    """Check a fit answer was signed by ``hospital`` for this run and round."""
    verify_answer(keys, answer, "update", hospital, run, round, global_digest, task_id, nonces)


class UpdateVerifier:
    """The aggregator's check of hospitals' answers: their public keys plus the nonces seen."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey]) -> None:
        self.keys = dict(keys)
        self.nonces = NonceCache()

    def __call__(self, answer: Mapping[str, Any], hospital: str, run: str, round: int,
                 kind: str = "update", global_digest: str | None = None,
                 task_id: str | None = None) -> None:
        # Every kind once: a describe too is asked afresh by each run (services/aggregator/
        # gather.py), so a declaration seen before is a replay.
        verify_answer(self.keys, answer, kind, hospital, run, round, global_digest, task_id,
                      self.nonces)

    def secagg(self, envelope: Any, hospital: str, run: str, round: int, stage: str,
               body: Mapping[str, Any]) -> None:
        verify_secagg(self.keys, envelope, hospital, run, round, stage, body, self.nonces)


def secagg_digest(stage: str, body: Mapping[str, Any]) -> str:
    """A secure-aggregation answer's signature covers its stage and every field it carries
    (public keys, encrypted shares, the masked vector, revealed shares)."""
    return payload_digest("secagg", stage, dict(body))


def sign_secagg(key: Ed25519PrivateKey, hospital: str, run: str, round: int, stage: str,
                body: Mapping[str, Any]) -> dict[str, Any]:
    return sign(key, kind="secagg", signer=hospital, run=run, round=round, hospital=hospital,
                digest=secagg_digest(stage, body), extra={"stage": stage})


def verify_secagg(keys: Mapping[str, Ed25519PublicKey], envelope: Any, hospital: str, run: str,
                  round: int, stage: str, body: Mapping[str, Any],
                  nonces: NonceCache | None = None) -> None:
    """Check a secure-aggregation message was signed by ``hospital`` for this run, round and
    stage, over exactly ``body``."""
    extra = verify(keys, envelope, kind="secagg", signer=hospital, run=run, round=round,
                   hospital=hospital, digest=secagg_digest(stage, body), nonces=nonces)
    if extra.get("stage") != stage:
        raise SignatureRejected("replay", f"signed for stage {extra.get('stage')!r}, "
                                f"not {stage!r}")


def task_digest(task: str, args: list[Any] | tuple[Any, ...]) -> str:
    """A task signature covers the task name and every argument (weights and config)."""
    return payload_digest("task", task, list(args))


def sign_task(key: Ed25519PrivateKey, task: str, hospital: str, args: list[Any],
              ) -> dict[str, Any]:
    config = args[1] if len(args) > 1 and isinstance(args[1], Mapping) else {}
    return sign(key, kind="task", signer=AGGREGATOR, run=str(config.get("run_id", "")),
                round=int(config.get("round", 0)), hospital=hospital,
                digest=task_digest(task, args), extra={"task": task})


def verify_task(key: Ed25519PublicKey, auth: Any, task: str, hospital: str, args: list[Any],
                nonces: NonceCache | None = None, max_age_s: float | None = None) -> None:
    """Check a task was signed by the aggregator, for this hospital, over these arguments."""
    config = args[1] if len(args) > 1 and isinstance(args[1], Mapping) else {}
    try:
        round_ = int(config.get("round", 0))
    except (TypeError, ValueError) as exc:
        raise SignatureRejected("forged", "round is not an int") from exc
    verify({AGGREGATOR: key}, auth, kind="task", signer=AGGREGATOR,
           run=str(config.get("run_id", "")), round=round_, hospital=hospital,
           digest=task_digest(task, args), nonces=nonces, max_age_s=max_age_s)


# ---------------------------------------------------------------- registered models


def model_digest(model_name: str, version: str, onnx_sha256: str) -> str:
    """A model signature covers the registered name, the version number and the ONNX file's
    SHA-256: retagging a version to another file, or another version's signature to this
    one, breaks it."""
    return payload_digest("model", model_name, str(version), onnx_sha256)


def sign_model(key: Ed25519PrivateKey, model_name: str, version: str, onnx_sha256: str,
               weights_sha256: str, run: str = "", round: int = 0,
               artifact_uri: str | None = None) -> str:
    """The aggregator's signature of a registered version, as text for an MLflow tag
    (base64 of the msgpack envelope). The Keras weights' digest rides in the signed claims,
    so an auditor can check the Keras artifact against the same signature, and so does the
    ONNX file's address (``artifact_uri``): the inference service downloads from the signed
    address, never from an editable tag (issue 26, finding 6)."""
    extra = {"model": model_name, "version": str(version), "onnx_sha256": onnx_sha256,
             "weights_sha256": weights_sha256}
    if artifact_uri is not None:
        extra["artifact_uri"] = artifact_uri
    env = sign(key, kind="model", signer=AGGREGATOR, run=run, round=round, hospital="",
               digest=model_digest(model_name, version, onnx_sha256), extra=extra)
    return base64.b64encode(msgpack.packb(env, use_bin_type=True)).decode("ascii")


def verify_model(key: Ed25519PublicKey, signature: str | None, model_name: str, version: str,
                 onnx_sha256: str) -> dict[str, Any]:
    """Check ``signature`` (the tag text) is the aggregator's, over exactly this name, version
    and ONNX digest; raise SignatureRejected otherwise. Returns the signed claims."""
    if not signature:
        raise SignatureRejected("unsigned", "the version carries no model signature")
    try:
        env = msgpack.unpackb(base64.b64decode(signature, validate=True), raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise SignatureRejected("forged", "the model signature is not a signature envelope"
                                ) from exc
    if not isinstance(env, Mapping) or not isinstance(env.get("run"), str) \
            or isinstance(env.get("round"), bool) or not isinstance(env.get("round"), int):
        raise SignatureRejected("unsigned", "model signature envelope malformed")
    # Run and round are the ones the envelope names (the signature covers them); what must
    # match is the name, the version and the digest of the bytes about to be served.
    extra = verify({AGGREGATOR: key}, env, kind="model", signer=AGGREGATOR, run=env["run"],
                   round=env["round"], hospital="",
                   digest=model_digest(model_name, version, onnx_sha256))
    return {**extra, "run": env["run"], "round": env["round"], "signed_at": env["signed_at"]}


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m leukofed.signing",
                                     description="Ed25519 keys for tasks and updates.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    gen = sub.add_parser("generate", help="make <name>.key and <name>.pub for each name")
    gen.add_argument("names", nargs="+", help="'aggregator' and/or hospital ids")
    gen.add_argument("--out", type=Path, required=True)
    gen.add_argument("--overwrite", action="store_true", help="rotate existing keys")
    args = parser.parse_args(argv)
    for name in args.names:
        key_path, pub_path = generate_keypair(args.out, name, args.overwrite)
        print(f"{name}: private {key_path} (keep it there), public {pub_path} (share it)")


if __name__ == "__main__":
    main()
