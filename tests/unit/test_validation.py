"""Server-side update validation: every bad update is rejected with its reason; good ones pass."""

from __future__ import annotations

import numpy as np
import pytest

from leukofed.validation import REASONS, UpdateRejected, update_norm, validate_update


def global_weights() -> dict[str, np.ndarray]:
    # ||global||_2 = sqrt(3^2 + 4^2 + 0^2) = 5 (the int counter does not count)
    return {"k": np.array([[3.0, 4.0]], np.float32), "bn/moving_mean": np.zeros(1, np.float32),
            "count": np.array(2, np.int64)}


def update(**changes: np.ndarray) -> dict[str, np.ndarray]:
    out = {k: v.copy() for k, v in global_weights().items()}
    out.update(changes)
    return out


def rejected(u: dict, **kwargs) -> UpdateRejected:
    with pytest.raises(UpdateRejected) as info:
        validate_update(global_weights(), u, **kwargs)
    assert info.value.reason in REASONS and str(info.value) == info.value.message
    assert isinstance(info.value, ValueError)
    return info.value


def test_normal_update_is_accepted() -> None:
    validate_update(global_weights(), update(k=np.array([[3.5, 3.0]], np.float32)))
    # fp16 on the wire is decoded back to float32, but a float16 update is also compatible
    validate_update(global_weights(), update(k=np.array([[3.5, 3.0]], np.float16)))
    validate_update(global_weights(), update(count=np.array(9, np.int64)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad: float) -> None:
    e = rejected(update(**{"bn/moving_mean": np.array([bad], np.float32)}))
    assert e.reason == "non_finite" and "bn/moving_mean" in str(e)


def test_wrong_shape_is_rejected() -> None:
    e = rejected(update(k=np.array([[3.0], [4.0]], np.float32)))
    assert e.reason == "shape" and "(2, 1)" in str(e) and "(1, 2)" in str(e)


def test_same_size_reshape_is_rejected() -> None:
    assert rejected(update(k=np.array([3.0, 4.0], np.float32))).reason == "shape"


def test_missing_and_extra_names_are_listed() -> None:
    u = update(extra=np.zeros(1, np.float32))
    del u["k"]
    e = rejected(u)
    assert e.reason == "names" and "missing k" in str(e) and "unexpected extra" in str(e)


@pytest.mark.parametrize("changes", [
    {"k": np.array([[3, 4]], np.int32)},
    {"count": np.array(2.0, np.float64)},
    {"count": np.array(2, np.int32)},
    {"k": np.array([[3.0, 4.0]], dtype=object)},
])
def test_incompatible_dtypes_are_rejected(changes: dict) -> None:
    assert rejected(update(**changes)).reason == "dtype"


def test_non_arrays_are_a_schema_error() -> None:
    assert rejected(update(k=[[3.0, 4.0]])).reason == "schema"  # type: ignore[arg-type]
    assert rejected("weights").reason == "schema"  # type: ignore[arg-type]


def test_norm_bound_by_hand() -> None:
    # global norm 5, ratio 10 -> bound 50. k moved by (30, 40): ||diff|| = 50 -> accepted
    validate_update(global_weights(), update(k=np.array([[33.0, 44.0]], np.float32)))
    # moved by (30, 40.1): ||diff|| = 50.08 > 50 -> rejected
    e = rejected(update(k=np.array([[33.0, 44.1]], np.float32)))
    assert e.reason == "norm" and "exceeds 50" in str(e)
    # a tighter ratio rejects a smaller step: (3, 0) > 0.5 * 5 = 2.5
    assert rejected(update(k=np.array([[6.0, 4.0]], np.float32)),
                    max_norm_ratio=0.5).reason == "norm"


def test_absurd_norm_is_rejected() -> None:
    scaled = update(k=global_weights()["k"] * 1e6)
    assert rejected(scaled).reason == "norm"
    huge = update(k=np.array([[3e38, 3e38]], np.float32))  # near float32's max: ||diff||^2 ~ 1.8e77
    assert rejected(huge).reason == "norm"


def test_small_global_model_uses_the_floor() -> None:
    g = {"w": np.zeros(2, np.float32)}
    # ||global|| = 0 -> reference 1.0 -> bound 10: a step of norm 5 is fine, 20 is not
    validate_update(g, {"w": np.array([3.0, 4.0], np.float32)})
    with pytest.raises(UpdateRejected):
        validate_update(g, {"w": np.array([12.0, 16.0], np.float32)})


def test_update_norm_by_hand() -> None:
    diff, ref = update_norm(global_weights(), update(k=np.array([[6.0, 8.0]], np.float32)))
    assert (diff, ref) == (5.0, 5.0)  # diff (3, 4) -> 5 ; global (3, 4) -> 5
