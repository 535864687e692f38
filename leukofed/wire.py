"""The weight-update wire format: named tensors in a versioned msgpack document, no pickle.

Weights travel everywhere as an ordered ``dict[str, np.ndarray]``. On the wire a document is

    {"v": 1, "compression": "none" | "fp16",
     "tensors": [{"name", "dtype", "shape", "sha256", "data"[, "orig_dtype"]}, ...]}

``data`` is the raw little-endian C-order bytes and ``sha256`` hashes exactly those bytes,
so a hospital's audit log and the aggregator agree on what was sent. ``decode_weights``
trusts nothing: version, field types, a dtype whitelist (never ``object``), shape against
byte length and every hash are checked before a single array is built. msgpack carries no
code, unlike pickle, so a hostile payload can at worst be rejected.

With ``fp16=True`` float32 tensors travel as float16 (half the bytes); a tensor whose finite
values exceed float16's range is sent uncompressed rather than silently turned into inf.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Collection, Mapping
from typing import Any

import msgpack
import numpy as np

WIRE_VERSION = 1
COMPRESSIONS = ("none", "fp16")
ALLOWED_DTYPES = frozenset({
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
})
_FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})
_TENSOR_FIELDS = frozenset({"name", "dtype", "shape", "sha256", "data"})
# Checked before numpy sees a shape: numpy itself raises a plain ValueError past 64
# dimensions or 2**63 elements, which used to end a whole run as "internal error".
MAX_RANK = 8
MAX_ELEMENTS = 2**31
_FP16_MAX = float(np.finfo(np.float16).max)
_SEED_STATE = "seed_generator_state"


class WireFormatError(ValueError):
    """A weight-update document that is malformed, tampered with or of another version."""


def _wire_array(name: str, value: Any) -> np.ndarray:
    """Contiguous little-endian array of a whitelisted dtype, or a clear error."""
    if not isinstance(name, str) or not name:
        raise WireFormatError(f"tensor names must be non-empty strings, got {name!r}")
    array = np.asarray(value)
    if array.dtype.name not in ALLOWED_DTYPES:
        raise WireFormatError(f"tensor {name!r}: dtype {array.dtype} cannot go on the wire")
    # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
    return array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)


def encode_weights(weights: Mapping[str, np.ndarray], fp16: bool = False) -> bytes:
    """Serialize named tensors, in order; ``fp16`` halves float32 tensors' bytes."""
    tensors = []
    for name, value in weights.items():
        array = _wire_array(name, value)
        entry: dict[str, Any] = {}
        if fp16 and array.dtype.name == "float32":
            finite = array[np.isfinite(array)]
            if finite.size == 0 or float(np.abs(finite).max()) <= _FP16_MAX:
                entry["orig_dtype"] = "float32"
                array = array.astype("<f2")
        data = array.tobytes()
        entry.update(name=name, dtype=array.dtype.name, shape=list(array.shape),
                     sha256=hashlib.sha256(data).hexdigest(), data=data)
        tensors.append(entry)
    document = {"v": WIRE_VERSION, "compression": "fp16" if fp16 else "none", "tensors": tensors}
    return msgpack.packb(document, use_bin_type=True)


def _decode_tensor(index: int, entry: Any, compression: str) -> tuple[str, np.ndarray]:
    if not isinstance(entry, dict):
        raise WireFormatError(f"tensor #{index} is not a map")
    missing = _TENSOR_FIELDS - entry.keys()
    extra = entry.keys() - _TENSOR_FIELDS - {"orig_dtype"}
    if missing or extra:
        raise WireFormatError(
            f"tensor #{index}: missing fields {sorted(missing)}, unknown fields {sorted(extra)}")
    name, dtype, shape, digest, data = (entry[k] for k in ("name", "dtype", "shape", "sha256",
                                                            "data"))
    if not isinstance(name, str) or not name:
        raise WireFormatError(f"tensor #{index}: name must be a non-empty string")
    where = f"tensor {name!r}"
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise WireFormatError(f"{where}: dtype {dtype!r} is not allowed on the wire")
    if not isinstance(shape, list) or not all(
        type(d) is int and d >= 0 for d in shape
    ):
        raise WireFormatError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    if len(shape) > MAX_RANK or any(d > MAX_ELEMENTS for d in shape) \
            or math.prod(shape) > MAX_ELEMENTS:
        raise WireFormatError(f"{where}: shape {shape!r} is beyond {MAX_RANK} dimensions or "
                              f"{MAX_ELEMENTS} elements")
    if not isinstance(data, bytes):
        raise WireFormatError(f"{where}: data must be binary")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise WireFormatError(f"{where}: sha256 must be 64 lowercase hex digits")
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise WireFormatError(
            f"{where}: {len(data)} bytes do not fit shape {shape} of {dtype} ({expected} bytes)")
    if hashlib.sha256(data).hexdigest() != digest:
        raise WireFormatError(f"{where}: sha256 mismatch, the data was altered in transit")
    array = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    target = dtype
    if "orig_dtype" in entry:
        target = entry["orig_dtype"]
        if compression != "fp16" or dtype != "float16" or target not in _FLOAT_DTYPES:
            raise WireFormatError(
                f"{where}: orig_dtype {target!r} only allowed for float16 under fp16 compression")
    return name, array.astype(np.dtype(target).newbyteorder("="))  # a writable native copy


def decode_weights(blob: bytes) -> dict[str, np.ndarray]:
    """Parse and verify a document from ``encode_weights``; raise WireFormatError if bad."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise WireFormatError(f"expected bytes, got {type(blob).__name__}")
    try:
        document = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise WireFormatError(f"not a msgpack weight document: {exc}") from exc
    if not isinstance(document, dict):
        raise WireFormatError("a weight document must be a map")
    if document.keys() != {"v", "compression", "tensors"}:
        raise WireFormatError(
            f"weight document fields must be v, compression, tensors; got {sorted(document)}")
    if document["v"] != WIRE_VERSION:
        raise WireFormatError(
            f"unsupported wire version {document['v']!r}; this side speaks {WIRE_VERSION}")
    compression = document["compression"]
    if compression not in COMPRESSIONS:
        raise WireFormatError(f"unknown compression {compression!r}; known: {COMPRESSIONS}")
    if not isinstance(document["tensors"], list):
        raise WireFormatError("tensors must be a list")
    weights: dict[str, np.ndarray] = {}
    for index, entry in enumerate(document["tensors"]):
        name, array = _decode_tensor(index, entry, compression)
        if name in weights:
            raise WireFormatError(f"tensor {name!r} appears twice")
        weights[name] = array
    return weights


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in order: one hash per update for audit
    logs. Every field is length-prefixed, so no two different weight sets share a preimage."""
    h = hashlib.sha256()
    for name, value in weights.items():
        array = _wire_array(name, value)
        for field in (name.encode(), array.dtype.name.encode(),
                      struct.pack(f"<{array.ndim}q", *array.shape), array.tobytes()):
            h.update(struct.pack("<Q", len(field)))
            h.update(field)
    return h.hexdigest()


def payload_size(blob: bytes) -> int:
    """Bytes on the wire, for the participation log and the fp32-vs-fp16 benchmark."""
    return len(blob)


# Keras helpers. Names are Keras 3 variable paths ("block0_conv0/kernel"), with one fix:
# Keras numbers auto-named objects per process ("normalization" in EfficientNetB0 becomes
# "normalization_1" when a second model is built), so a worker that rebuilds its model would
# no longer match the aggregator's names. Path parts that are an auto-name (the snake_case
# class name of a layer in the model, plus "_<n>") lose the number; a name that then repeats
# gets "#1", "#2" in variable order. Explicit names such as "block0_conv0" or "Conv_1" are
# kept verbatim. Dropout's RNG state (seed_generator_state) is per process, not something the
# model learned, and is left out.


def _snake(name: str) -> str:
    """keras.src.utils.naming.to_snake_case, copied to avoid a private import."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _named_variables(model: Any) -> list[tuple[str, Any]]:
    auto = {_snake(type(layer).__name__)
            for layer in model._flatten_layers(include_self=True, recursive=True)}
    named: list[tuple[str, Any]] = []
    seen: dict[str, int] = {}
    for variable in model.variables:
        parts = variable.path.split("/")
        if parts[-1] == _SEED_STATE:
            continue
        for i, part in enumerate(parts[:-1]):
            match = re.fullmatch(r"(.+)_\d+", part)
            if match and match.group(1) in auto:
                parts[i] = match.group(1)
        name = "/".join(parts)
        count = seen.get(name, 0)
        seen[name] = count + 1
        named.append((f"{name}#{count}" if count else name, variable))
    return named


def weights_from_model(model: Any) -> dict[str, np.ndarray]:
    """All variables, trainable or not (BatchNorm moving statistics travel too), in order."""
    return {name: np.asarray(v.numpy()) for name, v in _named_variables(model)}


def set_model_weights(
    model: Any, weights: Mapping[str, np.ndarray], skip: Collection[str] = ()
) -> None:
    """Load named weights into ``model``; ``skip`` names stay as they are (a FedBN client
    keeps its own BatchNorm statistics). Missing, extra or misshapen tensors raise."""
    named = [(n, v) for n, v in _named_variables(model) if n not in skip]
    wanted = {n for n, _ in named}
    missing = sorted(wanted - weights.keys())
    extra = sorted(weights.keys() - wanted - set(skip))
    if missing or extra:
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, extra {extra[:5]}"
                         f"{'...' if len(extra) > 5 else ''}")
    for name, variable in named:
        value = np.asarray(weights[name])
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(f"{name}: shape {value.shape} != model's {tuple(variable.shape)}")
    for name, variable in named:
        variable.assign(np.asarray(weights[name], dtype=variable.dtype))


def trainable_names(model: Any) -> set[str]:
    """Names of the variables that gradient descent changes."""
    ids = {id(v) for v in model.trainable_variables}
    return {name for name, v in _named_variables(model) if id(v) in ids}


def batchnorm_stat_names(model: Any) -> set[str]:
    """Names of every BatchNormalization moving_mean and moving_variance (nested included)."""
    from leukofed.models import batchnorm_layers

    ids = set()
    for layer in batchnorm_layers(model):
        ids.update({id(layer.moving_mean), id(layer.moving_variance)})
    return {name for name, v in _named_variables(model) if id(v) in ids}
