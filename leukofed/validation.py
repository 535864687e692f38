"""Server-side checks of one client update before it may join an aggregate.

A single bad update poisons the global model for every hospital: a NaN spreads through
averaging to every weight, a wrong shape crashes the round, and a huge update (a diverged
client, or a model-replacement attack that scales its update ~100x, Bagdasaryan et al. 2020)
drags the average wherever it wants. ``validate_update`` rejects such an update with a short
machine-readable ``reason`` so the round goes on without it and the log says why.

The norm bound: ||update - global||_2 over the float tensors must not exceed
``max_norm_ratio * max(||global||_2, min_reference_norm)``. A round of local training moves a
model by a fraction of its own norm (each Adam step moves a weight by at most about the
learning rate, and steps mostly cancel), even from scratch, where BatchNorm moving variances
fall from 1 to ~1e-3. A ratio of 10 leaves an order of magnitude of headroom for honest
hospitals while a scaled or exploded update is caught. The floor of 1.0 keeps a (near-)zero
global model from rejecting every honest update; real models are far above it (BatchNorm
gammas and moving variances start at 1, so ||global|| >= sqrt(channels)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from leukofed.labels import CLASSES
from leukofed.protocol import (
    AnswerInvalid,
    CalibrateAnswer,
    DeclaredSplits,
    EvaluateAnswer,
    FitAnswer,
    WireAnswer,
)
from leukofed.signing import SignatureRejected
from leukofed.wire import WireFormatError, decode_weights

REASONS = ("schema", "names", "shape", "dtype", "non_finite", "norm", "range", "inflated",
           "evaluation", "undeclared")


class UpdateRejected(ValueError):
    """An update that must not be aggregated; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _listed(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating)


def update_norm(global_weights: Mapping[str, np.ndarray],
                update: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """(||update - global||_2, ||global||_2) over the global model's float tensors, in float64."""
    diff_sq = ref_sq = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for name, g in global_weights.items():
            g = np.asarray(g)
            if not _is_float(g):
                continue
            g64 = g.astype(np.float64)
            d = np.asarray(update[name], dtype=np.float64) - g64
            diff_sq += float(np.dot(d.ravel(), d.ravel()))
            ref_sq += float(np.dot(g64.ravel(), g64.ravel()))
    return math.sqrt(diff_sq), math.sqrt(ref_sq)


def validate_update(global_weights: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray],
                    max_norm_ratio: float = 10.0, min_reference_norm: float = 1.0) -> None:
    """Raise UpdateRejected unless ``update`` fits ``global_weights`` tensor for tensor, is
    finite everywhere and lies within the norm bound described in the module docstring."""
    if not isinstance(update, Mapping) or not all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in update.items()
    ):
        raise UpdateRejected("schema", "an update must map tensor names to numpy arrays")

    missing = [n for n in global_weights if n not in update]
    extra = [n for n in update if n not in global_weights]
    if missing or extra:
        parts = ([f"missing {_listed(missing)}"] if missing else []) + (
            [f"unexpected {_listed(extra)}"] if extra else [])
        raise UpdateRejected("names", "tensor names differ from the global model: "
                             + "; ".join(parts))

    wrong = [f"{n} {update[n].shape} != {np.shape(g)}" for n, g in global_weights.items()
             if update[n].shape != np.shape(g)]
    if wrong:
        raise UpdateRejected("shape", f"wrong shapes: {_listed(wrong)}")

    bad_dtype = []
    for name, g in global_weights.items():
        g, u = np.asarray(g), update[name]
        ok = _is_float(u) if _is_float(g) else u.dtype == g.dtype
        if not ok:
            bad_dtype.append(f"{name} {u.dtype} for {g.dtype}")
    if bad_dtype:
        raise UpdateRejected("dtype", f"incompatible dtypes: {_listed(bad_dtype)}")

    non_finite = [n for n, u in update.items() if _is_float(u) and not np.isfinite(u).all()]
    if non_finite:
        raise UpdateRejected("non_finite", f"NaN or inf in {_listed(non_finite)}")

    diff, ref = update_norm(global_weights, update)
    bound = max_norm_ratio * max(ref, min_reference_norm)
    if not diff <= bound:  # also catches a norm that overflowed to inf
        raise UpdateRejected("norm", f"update norm {diff:.4g} exceeds {bound:.4g} "
                             f"({max_norm_ratio:g} x global norm {ref:.4g})")


def validate_batchnorm_stats(global_stats: Mapping[str, np.ndarray],
                             stats: Mapping[str, np.ndarray],
                             max_norm_ratio: float = 10.0) -> None:
    """A hospital's calibrated BatchNorm statistics: the update checks above on exactly the
    BatchNorm tensors, plus no negative variance (``range``)."""
    validate_update(global_stats, stats, max_norm_ratio=max_norm_ratio)
    negative = [n for n, v in stats.items() if n.endswith("moving_variance") and (v < 0).any()]
    if negative:
        raise UpdateRejected("range", f"negative variance in {_listed(negative)}")


# ---------------------------------------------------------------- the rest of an answer


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def validate_answer_scalars(answer: Mapping[str, Any]) -> None:
    """The numbers a fit or calibrate answer carries beside its tensors: ``metrics`` and
    ``timings`` map names to finite numbers, ``class_counts`` classes to counts. A string
    where a number belongs is this hospital's problem (rejected), never the run's."""
    for field in ("metrics", "timings"):
        value = answer.get(field, {})
        if not isinstance(value, Mapping) or not all(
                isinstance(k, str) and _number(v) for k, v in value.items()):
            raise UpdateRejected("schema", f"{field} must map names to finite numbers")
    counts = answer.get("class_counts", {})
    if not isinstance(counts, Mapping) or not all(
            k in CLASSES and _count(v) for k, v in counts.items()):
        raise UpdateRejected("schema", "class_counts must map class names to counts")


def check_declared(num_examples: int, declared: int, what: str = "training") -> None:
    """A hospital's claimed example count may not exceed the count it declared when it
    enrolled (``describe``): FedAvg weights by it, so 10**9 would replace the global model."""
    if num_examples > declared:
        raise UpdateRejected("inflated", f"claims {num_examples} {what} examples, declared "
                             f"{declared}")


def declaration(declared: Mapping[str, DeclaredSplits], hospital: str) -> DeclaredSplits:
    """What ``hospital`` declared for this run, verified (services/aggregator/gather.py);
    UpdateRejected("undeclared") when there is none. Without it no count it claims has a
    bound, so nothing of it is counted: fail closed (issue 26, finding 1: a hospital whose
    describe was late got a signed 10**9-example update in as the global model)."""
    splits = declared.get(hospital)
    if splits is None:
        raise UpdateRejected("undeclared", "no verified declaration (describe) for this run, "
                             "so no bound on what it claims")
    return splits


_T = TypeVar("_T", FitAnswer, CalibrateAnswer, EvaluateAnswer)


def decoded(cls: type[_T], answer: object, reason: str) -> _T:
    """``answer`` as its typed structure (leukofed.protocol); UpdateRejected(``reason``)
    naming the fields that do not hold. The checks above give the precise message for what
    they know; this catches anything else an answer gets wrong."""
    try:
        return cls.decode(answer)
    except AnswerInvalid as exc:
        raise UpdateRejected(reason, str(exc)) from None


def validate_evaluation(answer: Mapping[str, Any],
                        declared: Mapping[str, int] | None = None) -> EvaluateAnswer:
    """An evaluate answer: each split has ``n`` (at most the declared split size), and when
    ``n > 0`` a 4x4 confusion matrix of counts summing to ``n``, a finite non-negative loss
    and the accuracy that matrix gives. A forged answer cannot move pooled metrics (and so
    ``promote best``) beyond what a consistent one of that size could."""
    splits = answer.get("splits")
    if not isinstance(splits, Mapping) or not splits or set(splits) - {"val", "test"}:
        raise UpdateRejected("evaluation", "splits must map 'val'/'test' to their results")
    k = len(CLASSES)
    for name, s in splits.items():
        if not isinstance(s, Mapping) or not _count(s.get("n")):
            raise UpdateRejected("evaluation", f"{name}: n must be a non-negative int")
        n = s["n"]
        limit = (declared or {}).get(name)
        if limit is not None and n > limit:
            raise UpdateRejected("inflated", f"{name}: {n} images evaluated, {limit} declared")
        if n == 0:
            continue
        cm = s.get("confusion_matrix")
        if not (isinstance(cm, list) and len(cm) == k and all(
                isinstance(row, list) and len(row) == k and all(_count(c) for c in row)
                for row in cm)):
            raise UpdateRejected("evaluation", f"{name}: confusion_matrix must be {k}x{k} "
                                 "non-negative ints")
        total = sum(sum(row) for row in cm)
        if total != n:
            raise UpdateRejected("evaluation", f"{name}: confusion matrix sums to {total}, "
                                 f"n is {n}")
        if not (_number(s.get("loss")) and s["loss"] >= 0):
            raise UpdateRejected("evaluation", f"{name}: loss must be a finite number >= 0")
        accuracy = s.get("accuracy")
        if not _number(accuracy) or abs(accuracy - sum(cm[i][i] for i in range(k)) / n) > 1e-6:
            raise UpdateRejected("evaluation", f"{name}: accuracy {accuracy!r} is not what its "
                                 "confusion matrix gives")
    return decoded(EvaluateAnswer, answer, "evaluation")


# ---------------------------------------------------------------- a round's answers

Tensors = dict[str, np.ndarray]
Verify = Callable[[WireAnswer, str], None]  # (answer, hospital); raises SignatureRejected


def check_tensor_answers(answers: Mapping[str, WireAnswer], verify: Verify,
                         declared: Mapping[str, DeclaredSplits],
                         check: Callable[[Tensors], None], kind: str = "update"
                         ) -> tuple[dict[str, tuple[FitAnswer | CalibrateAnswer, Tensors]],
                                    dict[str, str]]:
    """Fit (``kind`` "update") or calibrate ("calibration") answers: signature first (nothing
    unsigned is even decoded), then a verified declaration for this run and a positive
    example count within it, the answer's other numbers, its typed structure, the wire
    format and ``check`` on the decoded tensors. Returns {hospital: (answer, tensors)} and
    {hospital: reason}; a bad answer is a reason, never an exception."""
    cls = FitAnswer if kind == "update" else CalibrateAnswer
    usable: dict[str, tuple[FitAnswer | CalibrateAnswer, Tensors]] = {}
    rejected: dict[str, str] = {}
    for hospital, answer in sorted(answers.items()):
        try:
            verify(answer, hospital)
            n = answer.get("num_examples")
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise UpdateRejected("schema", f"num_examples must be a positive int, "
                                               f"got {n!r}")
            check_declared(n, declaration(declared, hospital)["train"])
            validate_answer_scalars(answer)
            typed = decoded(cls, answer, "schema")
            tensors = decode_weights(typed.weights)
            check(tensors)
        except (SignatureRejected, UpdateRejected) as exc:
            rejected[hospital] = f"{exc.reason}: {exc.message}"
        except WireFormatError as exc:
            rejected[hospital] = f"wire: {exc}"
        else:
            usable[hospital] = (typed, tensors)
    return usable, rejected


def check_evaluations(answers: Mapping[str, WireAnswer], verify: Verify,
                      declared: Mapping[str, DeclaredSplits]
                      ) -> tuple[dict[str, EvaluateAnswer], dict[str, SignatureRejected |
                                                                    UpdateRejected]]:
    """Evaluation answers whose signature holds, from a hospital with a verified declaration,
    whose numbers hold together within it (``validate_evaluation``); the others with the
    exception that says why."""
    valid: dict[str, EvaluateAnswer] = {}
    rejected: dict[str, SignatureRejected | UpdateRejected] = {}
    for hospital, answer in sorted(answers.items()):
        try:
            verify(answer, hospital)
            valid[hospital] = validate_evaluation(answer, declaration(declared, hospital))
        except (SignatureRejected, UpdateRejected) as exc:
            rejected[hospital] = exc
    return valid, rejected
