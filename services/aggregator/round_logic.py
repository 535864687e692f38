"""The round loop's decisions as pure functions: who takes part, whether the quorum holds,
how per-hospital answers pool into global metrics, and the round's summary. No I/O here:
the answers arrive decoded (leukofed.protocol) and checked (leukofed.validation)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from leukofed.labels import CLASSES
from leukofed.protocol import EvaluateAnswer, FitReport, RoundSummary

JsonMap = dict[str, Any]  # a report kept in the run record as JSON (leukofed.calibration)


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


def poisson_sample(pool: Sequence[str], rate: float, rng: np.random.Generator) -> list[str]:
    """Each hospital of ``pool`` independently with probability ``rate``: the sampling the
    differential-privacy accountant assumes (a fixed-size sample would make its epsilon too
    small). May be empty or below any quorum; that is part of the mechanism."""
    return sorted(h for h in sorted(pool) if rng.random() < rate)


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


def combine_evaluations(results: Mapping[str, EvaluateAnswer]
                        ) -> tuple[dict[str, dict[str, float]], dict[str, list[list[int]]]]:
    """Pool the ``splits`` of every hospital's evaluate answer. Returns
    ({split: metrics}, {split: summed confusion matrix})."""
    metrics: dict[str, dict[str, float]] = {}
    matrices: dict[str, list[list[int]]] = {}
    names = sorted({s for r in results.values() for s in r.splits})
    for split in names:
        cm = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
        loss_sum, n = 0.0, 0
        for r in results.values():
            s = r.splits.get(split)
            if s is None or not s.n:
                continue
            cm += np.asarray(s.confusion_matrix, dtype=np.int64)
            loss_sum += float(s.loss or 0.0) * s.n
            n += s.n
        if n:
            metrics[split] = pooled_metrics(cm, loss_sum, n)
            matrices[split] = cm.tolist()
    return metrics, matrices


def hospital_metrics(fit: FitReport | None, evaluation: EvaluateAnswer | None,
                     num_examples: int | None = None) -> dict[str, float]:
    """One hospital's scalars for a round: training numbers and its own val/test scores.
    ``num_examples``: what its update counted for (a report kept without its tensors, as
    the streaming fit step keeps it, no longer carries the count)."""
    out: dict[str, float] = {}
    if fit is not None:
        out.update({f"train_{k}": float(v) for k, v in fit.metrics.items()})
        out["num_examples"] = float(num_examples if num_examples is not None
                                    else getattr(fit, "num_examples", 0))
        out["bytes_sent"] = float(fit.bytes)
        out.update({k: float(v) for k, v in fit.timings.items()})
    if evaluation is not None:
        for split, s in evaluation.splits.items():
            if s.n:
                out[f"{split}_accuracy"] = float(s.accuracy or 0.0)
                out[f"{split}_loss"] = float(s.loss or 0.0)
                out[f"{split}_n"] = float(s.n)
    return out


# A hospital that joins a run after its first round has its laboratory answered (its
# acquisition statistics in the served profile) only once the model does about as well on
# its own validation images as on the established hospitals' (``profile_members``).
PROBATION_MIN_VAL_IMAGES = 20


def _val_confusion(evaluations: Mapping[str, EvaluateAnswer], hospital: str
                   ) -> np.ndarray | None:
    """A hospital's validation confusion matrix from its evaluate answer, if it sent one."""
    split = evaluations[hospital].splits.get("val") if hospital in evaluations else None
    if split is None or split.confusion_matrix is None:
        return None
    return np.asarray(split.confusion_matrix, np.int64)


def profile_members(used: Iterable[str], evaluations: Mapping[str, EvaluateAnswer],
                    established: Iterable[str] | None, margin: float | None
                    ) -> tuple[set[str], set[str], dict[str, str]]:
    """Whose acquisition statistics the served profile pools this round, and who is
    established from now on.

    The refer check answers an image only when it looks like the pooled training images
    (leukofed.ood). Pooling a joining hospital's statistics at once makes its laboratory
    "answered" the round it joins, before the model has learned it: measured through the
    real stack, a laboratory from outside the training range went from 100% referred to
    1.4% while 30% of its answers were wrong (docs/federated-recipe.md, point 16). So the
    hospitals of a run's first round are established; a later one is on probation until the
    new model's accuracy on its own validation split is within ``margin`` of what the
    established hospitals' pooled per-class recalls give at its class mix (classes they do
    not hold are left out of both), on at least ``PROBATION_MIN_VAL_IMAGES`` images. Once
    established, always (no flapping between rounds). ``established`` None: the run's first
    round; ``margin`` None: no probation (every participant pooled, as before).

    Returns (hospitals to pool, established after this round, {hospital on probation:
    why})."""
    used = set(used)
    if established is None or margin is None:
        return used, used | set(established or ()), {}
    established = set(established)
    others = np.zeros((len(CLASSES), len(CLASSES)), np.int64)
    for h in established:
        cm = _val_confusion(evaluations, h)
        if cm is not None:
            others += cm
    support_others = others.sum(axis=1)
    recall_others = np.diag(others) / np.maximum(support_others, 1)
    known = support_others > 0  # classes the established hospitals hold
    passed: set[str] = set()
    held: dict[str, str] = {}
    for h in sorted(used - established):
        if not others.sum():
            held[h] = ("on probation: no established hospital's validation this round to "
                       "compare with; its images stay referred")
            continue
        cm = _val_confusion(evaluations, h)
        n = int(cm[known].sum()) if cm is not None else 0
        if n < PROBATION_MIN_VAL_IMAGES:
            held[h] = (f"on probation: {n} validation images of classes the established "
                       f"hospitals hold, fewer than {PROBATION_MIN_VAL_IMAGES} to show that "
                       "the model answers its laboratory; its images stay referred")
            continue
        assert cm is not None
        support = cm.sum(axis=1)
        accuracy = float(np.diag(cm)[known].sum() / n)
        expected = float((support[known] * recall_others[known]).sum() / n)
        if accuracy >= expected - margin:
            passed.add(h)
        else:
            held[h] = (f"on probation: accuracy {accuracy:.3f} on its {n} validation images "
                       f"against {expected:.3f} for the established hospitals at its class "
                       f"mix (margin {margin:g}); its images stay referred until it is within it")
    members = used & (established | passed)
    return members or used, established | passed, held


def pool_training_profiles(answers: Mapping[str, FitReport], used: Iterable[str],
                           profile_from: Iterable[str] | None = None
                           ) -> tuple[JsonMap | None, list[list[list[float]]] | None,
                                      dict[str, str]]:
    """Pool the participants' acquisition statistics and per-class stain sums, exactly.

    Returns (acquisition profile as stored in a version's metadata, class stain targets
    for the shortcut audit, {hospital: why its statistics were left out}). A hospital whose
    statistics are missing or malformed still contributes its update; only the profile
    leaves it out, with the reason logged. ``profile_from``: the participants whose
    acquisition statistics the profile pools (``profile_members``; default all); the stain
    targets pool every participant."""
    profile_from = set(used) if profile_from is None else set(profile_from)
    from leukofed.audit import targets_from_sums
    from leukofed.ood import AcquisitionProfile, ProfileStats

    pooled: ProfileStats | None = None
    sums: list[Mapping[str, Any]] = []
    skipped: dict[str, str] = {}
    for hospital in sorted(used):
        answer = answers.get(hospital)
        if hospital in profile_from:
            try:
                stats = ProfileStats.from_dict(dict(answer.acquisition or {}) if answer
                                               else {})
            except (ValueError, KeyError, TypeError) as exc:
                skipped[hospital] = f"acquisition statistics unusable: {exc}"
                continue
            pooled = stats if pooled is None else pooled.merge(stats)
        if answer is not None and answer.stain_sums is not None:
            sums.append(answer.stain_sums)
    profile = None
    if pooled is not None and pooled.count >= 2:
        profile = AcquisitionProfile.from_stats(pooled).to_dict()
    targets = targets_from_sums(list(sums), len(CLASSES)) if sums else None
    return profile, (targets.tolist() if targets is not None else None), skipped


class CalibrationSums:
    """The hospitals' calibration sums pooled as their evaluations arrive: the memory of
    one hospital's sums, whatever the number of hospitals (every sum is additive,
    leukofed.calibration.pool_sums)."""

    def __init__(self) -> None:
        # Held as arrays (leukofed.calibration.validated_arrays), lists only in report().
        self.pooled: dict[str, JsonMap | None] = {"val": None, "test": None}
        self.skipped: dict[str, str] = {}
        # The membership audit's histograms, pooled the same way (leukofed.membership).
        self.membership: dict[str, dict[str, np.ndarray]] | None = None
        self.membership_hospitals: list[str] = []
        self.membership_skipped: dict[str, str] = {}

    def add(self, hospital: str, evaluation: EvaluateAnswer,
            declared: Mapping[str, int] | None = None) -> None:
        """A hospital with malformed sums keeps its accuracy numbers; only calibration
        leaves it out (with the reason in ``skipped``). Its membership histograms likewise
        (``membership_skipped``): no more members than its declared training split, no more
        non-members than its val and test splits (``declared``)."""
        from leukofed.calibration import add_sums, validated_arrays

        if evaluation.membership is not None:
            self._add_membership(hospital, evaluation.membership, declared)
        checked = {}
        try:
            for split in self.pooled:
                s = evaluation.splits.get(split)  # type: ignore[call-overload]
                if s is not None and s.calibration is not None:
                    checked[split] = validated_arrays(s.calibration)
            added = {split: add_sums(self.pooled[split], sums)
                     for split, sums in checked.items()}
        except (ValueError, TypeError, KeyError) as exc:
            self.skipped[hospital] = f"calibration sums unusable: {exc}"
            return
        self.pooled.update(added)

    def _add_membership(self, hospital: str, histograms: Mapping[str, Any],
                        declared: Mapping[str, int] | None) -> None:
        from leukofed.membership import add_histograms, validate_histograms

        d = declared or {}
        try:
            checked = validate_histograms(
                histograms, max_members=d.get("train"),
                max_nonmembers=(d["val"] + d["test"]) if "val" in d and "test" in d else None)
        except (ValueError, TypeError, KeyError) as exc:
            self.membership_skipped[hospital] = f"membership histograms unusable: {exc}"
            return
        self.membership = add_histograms(self.membership, checked)
        self.membership_hospitals.append(hospital)

    def membership_report(self) -> JsonMap | None:
        """The membership-inference audit of the version (leukofed.membership.attack_report)
        from the pooled histograms; None when no hospital sent usable ones."""
        from leukofed.membership import attack_report

        if self.membership is None:
            return None
        return attack_report(self.membership, hospitals=len(self.membership_hospitals))

    def report(self, coverage: float) -> JsonMap | None:
        """Temperature and conformal quantiles fitted on the pooled validation sums,
        measured on the pooled test sums; None without validation images."""
        from leukofed.calibration import as_json_sums, calibration_report

        val, test = self.pooled["val"], self.pooled["test"]
        if val is None or int(val["count"]) == 0:
            return None
        if test is not None and int(test["count"]) == 0:
            test = None
        return calibration_report(as_json_sums(val), coverage,
                                  as_json_sums(test) if test is not None else None)


def without_calibration(evaluation: EvaluateAnswer) -> EvaluateAnswer:
    """The answer as the round keeps it once its sums (and membership histograms) are
    pooled: counts and scalars."""
    return evaluation.model_copy(update={"membership": None, "splits": {
        k: v.model_copy(update={"calibration": None}) for k, v in evaluation.splits.items()}})


def pool_calibration(evaluations: Mapping[str, EvaluateAnswer], coverage: float,
                     sums: CalibrationSums | None = None
                     ) -> tuple[JsonMap | None, dict[str, str]]:
    """Fit the version's temperature and conformal quantiles from the hospitals' validation
    sums, and measure them on the pooled test sums (leukofed.calibration): no per-image
    score leaves a hospital.

    Returns (calibration report or None, {hospital: why its sums were left out}). A hospital
    with malformed sums keeps its accuracy numbers; only calibration leaves it out."""
    sums = sums if sums is not None else CalibrationSums()
    for hospital in sorted(evaluations):
        sums.add(hospital, evaluations[hospital])
    return sums.report(coverage), sums.skipped


def calibration_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The calibration report's scalars as round metrics (MLflow, curves, version tags)."""
    from leukofed.labels import CLASSES

    out = {"calibration_temperature": float(report["temperature"])}
    for key in ("ece_before", "ece_after", "nll_before", "nll_after"):
        out[f"val_{key}"] = float(report[key])
    for key in ("test_ece_before", "test_ece_after", "test_coverage"):
        if report.get(key) is not None:
            out[key.replace("test_coverage", "test_conformal_coverage")] = float(report[key])
    for name, value in zip(CLASSES, report.get("test_class_coverage") or []):
        if value is not None:
            out[f"test_conformal_coverage_{name}"] = float(value)
    for when in ("before", "after"):  # per-class (one-vs-rest) calibration
        for name, value in zip(CLASSES, report.get(f"classwise_ece_{when}") or []):
            out[f"val_classwise_ece_{when}_{name}"] = float(value)
    return out


def training_class_counts(answers: Mapping[str, FitReport], used: Iterable[str]
                          ) -> dict[str, dict[str, int]]:
    """Each participant's training images per class, from the stain sums its fit answer
    carries (absent in differentially private runs, malformed ones left out): for the
    model card."""
    out = {}
    for hospital in sorted(used):
        answer = answers.get(hospital)
        counts = ((answer.stain_sums if answer else None) or {}).get("counts")
        if (isinstance(counts, list) and len(counts) == len(CLASSES)
                and all(isinstance(c, int) and c >= 0 for c in counts)):
            out[hospital] = dict(zip(CLASSES, counts))
    return out


def server_test_report(y: np.ndarray, probs: np.ndarray,
                       calibration: Mapping[str, Any] | None
                       ) -> tuple[dict[str, float], list[list[int]], JsonMap | None]:
    """Metrics of one version on the server's held-out test split, and, when the version is
    calibrated, what its prediction sets do there: coverage per class, the share of images
    whose set is not one class (answered "refer"), accuracy on the images it answers."""
    from leukofed.calibration import Calibration, answered_report
    from leukofed.metrics import classification_metrics, flat_metrics

    m = classification_metrics(y, probs)
    flat = {k: v for k, v in flat_metrics(m).items() if not k.startswith(("precision_", "f1_"))}
    if calibration is None or len(y) == 0:
        return flat, m["confusion_matrix"], None  # type: ignore[return-value]
    report = answered_report(Calibration.from_dict(calibration["calibration"]), probs, y)
    conformal = {k: report[k] for k in ("coverage", "class_coverage", "target",
                                        "accuracy_answered", "ece_before", "ece_after")}
    conformal["refer_share"] = report["set_refer_share"]
    flat.update({"conformal_coverage": conformal["coverage"],
                 "set_refer_share": conformal["refer_share"],
                 "ece_before": conformal["ece_before"], "ece_after": conformal["ece_after"]})
    if conformal["accuracy_answered"] is not None:
        flat["accuracy_answered"] = conformal["accuracy_answered"]
    return flat, m["confusion_matrix"], conformal  # type: ignore[return-value]


@dataclass
class PooledRound:
    """What a round's accepted answers and evaluations add up to."""

    global_metrics: dict[str, float]
    confusion: dict[str, list[list[int]]]
    profile: JsonMap | None
    stain_targets: list[list[list[float]]] | None
    calibration: JsonMap | None
    # (hospital, message) for each hospital left out of a pooled number, in order
    left_out: list[tuple[str, str]] = field(default_factory=list)
    membership: JsonMap | None = None  # the membership-inference audit (leukofed.membership)
    # hospitals whose laboratory the run answers from now on (profile_members)
    established: list[str] = field(default_factory=list)


def pool_round(reports: Mapping[str, FitReport], used: Iterable[str],
               evaluations: Mapping[str, EvaluateAnswer], coverage: float,
               sums: CalibrationSums | None = None, established: Iterable[str] | None = None,
               probation_margin: float | None = None) -> PooledRound:
    """Pooled evaluation metrics, acquisition profile, stain targets and calibration of a
    round; ``used``: the hospitals whose update counted, ``reports`` their fit answers;
    ``sums``: the calibration sums already pooled as the evaluations arrived (else pooled
    here from ``evaluations``); ``established`` and ``probation_margin``: a joining
    hospital's probation (``profile_members``)."""
    pooled, matrices = combine_evaluations(evaluations)
    metrics = {f"{split}_{k}": v for split, m in pooled.items() for k, v in m.items()}
    members, now_established, probation = profile_members(used, evaluations, established,
                                                           probation_margin)
    profile, stain_targets, skipped = pool_training_profiles(reports, used, members)
    left_out = [(h, f"left out of the acquisition profile ({reason})")
                for h, reason in {**probation, **skipped}.items()]
    if sums is not None:
        calibration, unusable = sums.report(coverage), sums.skipped
    else:
        sums = CalibrationSums()
        calibration, unusable = pool_calibration(evaluations, coverage, sums)
    left_out += [(h, f"left out of calibration ({reason})") for h, reason in unusable.items()]
    left_out += [(h, f"left out of the membership audit ({reason})")
                 for h, reason in sums.membership_skipped.items()]
    if calibration is not None:
        metrics.update(calibration_metrics(calibration))
    membership = sums.membership_report()
    if membership is not None:
        from leukofed.membership import report_metrics

        metrics.update(report_metrics(membership))
    return PooledRound(metrics, matrices, profile, stain_targets, calibration, left_out,
                       membership, sorted(now_established))


def round_summary(server_round: int, attempt: int, selected: list[str], answered: Iterable[str],
                  reports: Mapping[str, FitReport], participants: Mapping[str, int],
                  rejected: dict[str, str], failures: dict[str, str],
                  evaluations: Mapping[str, EvaluateAnswer], pooled: PooledRound,
                  conformal: JsonMap | None) -> RoundSummary:
    """The round as the run record keeps it. ``answered``: every hospital whose fit answer
    arrived (accepted or not); ``reports``: the accepted ones'."""
    used = sorted(participants)
    return {
        "acquisition_profile": pooled.profile, "stain_targets": pooled.stain_targets,
        "calibration": pooled.calibration, "server_conformal": conformal,
        "membership": pooled.membership,
        "class_counts": training_class_counts(reports, used),
        "round": server_round, "attempt": attempt, "selected": selected,
        "participants": dict(participants),
        "rejected": rejected, "failed": failures,
        "global": pooled.global_metrics, "confusion": pooled.confusion,
        "hospitals": {h: hospital_metrics(reports.get(h) if h in participants else None,
                                          evaluations.get(h), participants.get(h))
                      for h in sorted(set(answered) | set(evaluations))},
        "bytes": {h: reports[h].bytes if h in reports else 0 for h in used},
        "sha256": {h: reports[h].sha256 if h in reports else "" for h in used},
        "fingerprints": {h: reports[h].dataset_fingerprint if h in reports else ""
                         for h in used},
    }
