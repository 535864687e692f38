"""The weight-update wire format: round trips, fp16, and everything a tampered payload tries."""

from __future__ import annotations

import hashlib
import pickle

import msgpack
import numpy as np
import pytest

from leukofed.wire import (
    WIRE_VERSION,
    WireFormatError,
    decode_weights,
    encode_weights,
    payload_size,
    weights_digest,
)


def sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "block0_conv0/kernel": rng.normal(size=(3, 3, 3, 4)).astype(np.float32),
        "block0_bn0/moving_variance": rng.uniform(0, 1, 4).astype(np.float32),
        "head/bias": np.array([0.5, -1.25], dtype=np.float64),
        "normalization/count": np.array(7, dtype=np.int64),
        "mask": np.array([[1, 0], [0, 255]], dtype=np.uint8),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def retamper(blob: bytes, change) -> bytes:
    document = msgpack.unpackb(blob, raw=False)
    change(document)
    return msgpack.packb(document, use_bin_type=True)


def test_round_trip_is_exact_and_ordered() -> None:
    weights = sample()
    blob = encode_weights(weights)
    back = decode_weights(blob)
    assert list(back) == list(weights)
    for name, value in weights.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        np.testing.assert_array_equal(back[name], value)
        assert back[name].flags.writeable
    assert payload_size(blob) == len(blob)


def test_document_layout() -> None:
    document = msgpack.unpackb(encode_weights({"w": np.arange(3, dtype=np.float32)}), raw=False)
    assert document["v"] == WIRE_VERSION == 1 and document["compression"] == "none"
    (entry,) = document["tensors"]
    assert entry["name"] == "w" and entry["dtype"] == "float32" and entry["shape"] == [3]
    assert entry["sha256"] == hashlib.sha256(entry["data"]).hexdigest()
    assert entry["data"] == np.arange(3, dtype="<f4").tobytes()


def test_big_endian_and_non_contiguous_inputs() -> None:
    base = np.arange(12, dtype=">f4").reshape(3, 4)
    back = decode_weights(encode_weights({"w": base.T}))
    np.testing.assert_array_equal(back["w"], base.T)


def test_fp16_halves_the_bytes_within_tolerance() -> None:
    rng = np.random.default_rng(2)
    weights = {"k": rng.normal(size=(64, 256)).astype(np.float32),
               "c": np.arange(4, dtype=np.int64), "d": np.array([1 / 3], dtype=np.float64)}
    full, half = encode_weights(weights), encode_weights(weights, fp16=True)
    assert 0.45 < payload_size(half) / payload_size(full) < 0.55
    back = decode_weights(half)
    assert back["k"].dtype == np.float32
    np.testing.assert_allclose(back["k"], weights["k"], rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(back["c"], weights["c"])  # integers untouched
    assert back["d"][0] == 1 / 3  # float64 untouched
    entries = msgpack.unpackb(half, raw=False)["tensors"]
    assert (entries[0]["dtype"], entries[0]["orig_dtype"]) == ("float16", "float32")
    assert "orig_dtype" not in entries[1] and entries[2]["dtype"] == "float64"


def test_fp16_keeps_tensors_beyond_its_range_exact() -> None:
    weights = {"big": np.array([1e6, 1.0], np.float32), "nan": np.array([np.nan], np.float32)}
    blob = encode_weights(weights, fp16=True)
    entries = msgpack.unpackb(blob, raw=False)["tensors"]
    assert entries[0]["dtype"] == "float32" and entries[1]["dtype"] == "float16"
    back = decode_weights(blob)
    assert back["big"][0] == 1e6 and np.isnan(back["nan"][0])


def test_digest_covers_names_dtypes_shapes_values_and_order() -> None:
    w = {"a": np.arange(4, dtype=np.float32), "b": np.ones(2, np.int32)}
    d = weights_digest(w)
    assert d == weights_digest(decode_weights(encode_weights(w)))
    assert len(d) == 64
    variants = [
        {"a2": w["a"], "b": w["b"]},
        {"a": w["a"].view(np.int32), "b": w["b"]},
        {"a": w["a"].reshape(2, 2), "b": w["b"]},
        {"a": w["a"] + 1, "b": w["b"]},
        {"b": w["b"], "a": w["a"]},
    ]
    assert len({d, *(weights_digest(v) for v in variants)}) == 6


def test_encode_refuses_what_cannot_travel() -> None:
    with pytest.raises(WireFormatError, match="dtype"):
        encode_weights({"o": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(WireFormatError, match="dtype"):
        encode_weights({"s": np.array(["text"])})
    with pytest.raises(WireFormatError, match="names"):
        encode_weights({3: np.zeros(1)})  # type: ignore[dict-item]


def first(document: dict) -> dict:
    return document["tensors"][0]


@pytest.mark.parametrize(("change", "match"), [
    (lambda d: first(d).update(data=b"\x01" + first(d)["data"][1:]), "sha256 mismatch"),
    # a same-size reshape ([2, 2]) keeps the data hash; validate_update catches that one
    (lambda d: first(d).update(shape=[2, 3]), "do not fit shape"),
    (lambda d: first(d).update(shape=[-3]), "non-negative"),
    (lambda d: first(d).update(dtype="float64"), "do not fit shape"),
    (lambda d: first(d).update(dtype="object"), "not allowed"),
    (lambda d: first(d).update(dtype="|O"), "not allowed"),
    (lambda d: first(d).update(sha256="00"), "sha256"),
    (lambda d: first(d).update(data="text"), "binary"),
    (lambda d: first(d).pop("sha256"), "missing fields"),
    (lambda d: first(d).update(pickle=b"x"), "unknown fields"),
    (lambda d: first(d).update(orig_dtype="float64"), "orig_dtype"),
    (lambda d: d["tensors"].append(dict(first(d))), "appears twice"),
    (lambda d: d.update(v=2), "unsupported wire version 2"),
    (lambda d: d.update(compression="zstd"), "compression"),
    (lambda d: d.update(tensors={"a": 1}), "must be a list"),
    (lambda d: d.update(extra=1), "fields"),
    (lambda d: d["tensors"].append(7), "not a map"),
])
def test_tampered_documents_are_rejected(change, match: str) -> None:
    blob = retamper(encode_weights({"w": np.arange(4, dtype=np.float32)}), change)
    with pytest.raises(WireFormatError, match=match):
        decode_weights(blob)


@pytest.mark.parametrize("blob", [
    b"",
    b"\xc1garbage",
    encode_weights({"w": np.zeros(3, np.float32)})[:-5],  # truncated
    encode_weights({"w": np.zeros(3, np.float32)}) + b"\x00",  # trailing bytes
    pickle.dumps({"w": np.zeros(3)}),
    msgpack.packb([1, 2, 3]),
    msgpack.packb(msgpack.ExtType(1, b"payload")),
    msgpack.packb({1: 2}),
])
def test_garbage_is_rejected(blob: bytes) -> None:
    with pytest.raises(WireFormatError):
        decode_weights(blob)


def test_decode_refuses_non_bytes() -> None:
    with pytest.raises(WireFormatError, match="expected bytes"):
        decode_weights("not bytes")  # type: ignore[arg-type]


# --- Keras helpers (builds tiny models; trains nothing) ---------------------------------------

def tiny_model():
    keras = pytest.importorskip("keras")
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(0.1)(x)
    x = keras.layers.Dense(3)(x)
    outputs = keras.layers.Dense(2, name="head")(x)
    return keras.Model(inputs, outputs)


def test_model_helpers_names_are_stable_across_rebuilds() -> None:
    from leukofed.wire import (
        batchnorm_stat_names,
        set_model_weights,
        trainable_names,
        weights_from_model,
    )

    a, b = tiny_model(), tiny_model()  # the second gets dense_2, dense_3, ... from Keras
    wa, wb = weights_from_model(a), weights_from_model(b)
    assert list(wa) == list(wb) == [
        "dense/kernel", "dense/bias",
        "batch_normalization/gamma", "batch_normalization/beta",
        "batch_normalization/moving_mean", "batch_normalization/moving_variance",
        "dense/kernel#1", "dense/bias#1", "head/kernel", "head/bias",
    ]  # the Dropout's seed_generator_state is left out
    assert batchnorm_stat_names(a) == {"batch_normalization/moving_mean",
                                       "batch_normalization/moving_variance"}
    assert trainable_names(a) == set(wa) - batchnorm_stat_names(a)

    wa["batch_normalization/moving_mean"][:] = 0.25
    set_model_weights(b, wa)
    for name, value in weights_from_model(b).items():
        np.testing.assert_array_equal(value, wa[name])
    local = {k: v for k, v in wa.items() if k not in batchnorm_stat_names(a)}
    set_model_weights(b, local, skip=batchnorm_stat_names(b))  # FedBN: keep local stats

    with pytest.raises(ValueError, match="missing"):
        set_model_weights(b, local)
    with pytest.raises(ValueError, match="shape"):
        set_model_weights(b, {**wa, "head/bias": np.zeros(5, np.float32)})
