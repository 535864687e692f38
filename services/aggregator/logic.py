"""The round loop's decisions as pure functions: who takes part, whether the quorum holds,
and how per-hospital evaluations pool into global metrics. No I/O here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from leukofed.labels import CLASSES


def select_hospitals(requested: Sequence[str] | None, live: Iterable[str] | None,
                     fraction: float, min_fit_clients: int,
                     rng: np.random.Generator) -> list[str]:
    """Hospitals to ask this round.

    The pool is the requested list (or every live hospital when none was requested). Live
    ones are preferred, so a hospital that is down is not asked and one that came back is
    asked again; if fewer live ones than the quorum are known (liveness unknown, or a ping
    missed a busy worker) the whole requested pool is asked and the deadline decides. Then
    ``fraction`` of the pool is sampled, never fewer than ``min_fit_clients``.
    """
    live_set = set(live or ())
    pool = sorted(requested) if requested else sorted(live_set)
    preferred = [h for h in pool if h in live_set]
    candidates = preferred if len(preferred) >= min_fit_clients else pool
    if not candidates:
        return []
    k = min(len(candidates), max(min_fit_clients, int(np.ceil(fraction * len(candidates)))))
    if k == len(candidates):
        return list(candidates)
    picked = rng.choice(len(candidates), size=k, replace=False)
    return sorted(candidates[i] for i in picked)


def quorum_possible(answered_ok: int, pending: int, min_fit_clients: int) -> bool:
    """Whether waiting longer can still reach the quorum."""
    return answered_ok + pending >= min_fit_clients


def pooled_metrics(confusion: np.ndarray, loss_sum: float, n: int,
                   classes: Sequence[str] = CLASSES) -> dict[str, float]:
    """Accuracy, macro-F1 and per-class recall from a confusion matrix summed over
    hospitals: the same numbers as if every test image sat in one place (example-weighted)."""
    cm = np.asarray(confusion, dtype=np.float64)
    total = cm.sum()
    out: dict[str, float] = {"n": float(n), "loss": loss_sum / n if n else float("nan"),
                             "accuracy": float(np.trace(cm) / total) if total else 0.0}
    f1s = []
    for i, name in enumerate(classes):
        tp, row, col = cm[i, i], cm[i, :].sum(), cm[:, i].sum()
        recall = tp / row if row else 0.0
        precision = tp / col if col else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[f"recall_{name}"] = float(recall)
        if row:  # a class no hospital holds in this split says nothing about the model
            f1s.append(f1)
    out["macro_f1"] = float(np.mean(f1s)) if f1s else 0.0
    return out


def combine_evaluations(results: Mapping[str, Mapping[str, Any]]
                        ) -> tuple[dict[str, dict[str, float]], dict[str, list[list[int]]]]:
    """Pool the ``splits`` of every hospital's evaluate answer. Returns
    ({split: metrics}, {split: summed confusion matrix})."""
    metrics: dict[str, dict[str, float]] = {}
    matrices: dict[str, list[list[int]]] = {}
    names = sorted({s for r in results.values() for s in r.get("splits", {})})
    for split in names:
        cm = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
        loss_sum, n = 0.0, 0
        for r in results.values():
            s = r.get("splits", {}).get(split, {})
            if not s.get("n"):
                continue
            cm += np.asarray(s["confusion_matrix"], dtype=np.int64)
            loss_sum += float(s["loss"]) * int(s["n"])
            n += int(s["n"])
        if n:
            metrics[split] = pooled_metrics(cm, loss_sum, n)
            matrices[split] = cm.tolist()
    return metrics, matrices


def hospital_metrics(fit: Mapping[str, Any] | None, evaluation: Mapping[str, Any] | None
                     ) -> dict[str, float]:
    """One hospital's scalars for a round: training numbers and its own val/test scores."""
    out: dict[str, float] = {}
    if fit:
        out.update({f"train_{k}": float(v) for k, v in fit.get("metrics", {}).items()})
        out["num_examples"] = float(fit.get("num_examples", 0))
        out["bytes_sent"] = float(fit.get("bytes", 0))
        out.update({k: float(v) for k, v in fit.get("timings", {}).items()})
    if evaluation:
        for split, s in evaluation.get("splits", {}).items():
            if s.get("n"):
                out[f"{split}_accuracy"] = float(s["accuracy"])
                out[f"{split}_loss"] = float(s["loss"])
                out[f"{split}_n"] = float(s["n"])
    return out


def pool_training_profiles(answers: Mapping[str, Mapping[str, Any]], used: Iterable[str]
                           ) -> tuple[dict[str, Any] | None, list[list[list[float]]] | None,
                                      dict[str, str]]:
    """Pool the participants' acquisition statistics and per-class stain sums, exactly.

    Returns (acquisition profile as stored in a version's metadata, class stain targets
    for the shortcut audit, {hospital: why its statistics were left out}). A hospital whose
    statistics are missing or malformed still contributes its update; only the profile
    leaves it out, with the reason logged."""
    from leukofed.audit import targets_from_sums
    from leukofed.ood import AcquisitionProfile, ProfileStats

    pooled: ProfileStats | None = None
    sums: list[Mapping[str, Any]] = []
    skipped: dict[str, str] = {}
    for hospital in sorted(used):
        answer = answers.get(hospital) or {}
        try:
            stats = ProfileStats.from_dict(dict(answer.get("acquisition") or {}))
        except (ValueError, KeyError, TypeError) as exc:
            skipped[hospital] = f"acquisition statistics unusable: {exc}"
            continue
        pooled = stats if pooled is None else pooled.merge(stats)
        if isinstance(answer.get("stain_sums"), Mapping):
            sums.append(answer["stain_sums"])
    profile = None
    if pooled is not None and pooled.count >= 2:
        profile = AcquisitionProfile.from_stats(pooled).to_dict()
    targets = targets_from_sums(list(sums), len(CLASSES)) if sums else None
    return profile, (targets.tolist() if targets is not None else None), skipped
