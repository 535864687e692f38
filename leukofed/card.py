"""A model card per registered version, generated from numbers, never written by hand.

``build_card(info)`` turns what is known about one version (its training data, its
federation, its test confusion matrix, its calibration, its conformal coverage, its shortcut
audit, its membership-inference audit, its out-of-distribution referral) into a JSON-able
dict; ``card_markdown``, ``card_html`` and ``card_summary`` render that dict for the
registry, a browser and ``leukofed promote``.

Every metric carries a 95% bootstrap interval computed from the test confusion matrix alone
(``bootstrap_intervals``): resampling the test images with replacement is the same as drawing
the matrix's cells from a multinomial with the observed cell shares, so the pooled confusion
matrix of a federation's test splits gets intervals without any per-image data leaving a
hospital.

A section with no numbers says "not measured for this version" rather than disappearing,
and the dataset's known limitations (docs/shortcuts.md) are on every card whatever the
numbers say. Pure Python and numpy: no framework, no I/O.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from leukofed.audit import AUDIT_ROWS, DEFAULT_MAX_FOLLOW_COLOUR
from leukofed.labels import BENIGN_INDEX, CLASSES

CARD_FORMAT = "leukofed-model-card/1"
NOT_MEASURED = "not measured for this version"

DISPLAY_NAMES: dict[str, str] = {
    "Benign": "Benign",
    "Early": "Early Pre-B",
    "Pre": "Pre-B",
    "Pro": "Pro-B",
}

# Targets for the default recipe (docs/shortcuts.md, "Where we stand against the targets").
RECOLOURED_TARGET_POINTS = 0.03
SPATIAL_TARGET_POINTS = 0.06
FOLLOW_COLOUR_TARGET = 0.03
BACKGROUND_CHANCE = 0.25

INTENDED_USE = (
    "Decision support for a hematologist reading peripheral blood smear images of suspected "
    "acute lymphoblastic leukemia (ALL): for each image it suggests one of four classes "
    "(Benign, Early Pre-B, Pre-B, Pro-B) or refers the image to the hematologist. The "
    "hematologist reads the smear and makes the diagnosis; malignant means any class but "
    "Benign."
)

NOT_FOR: tuple[str, ...] = (
    "Diagnosis without a hematologist: every answer is a suggestion for a person who reads "
    "the smear.",
    "Images from other stains, laboratories, microscopes or cameras outside the version's "
    "acquisition profile: the service refers them, and its answers there are unmeasured.",
    "Bone marrow aspirates or biopsies: it has only seen peripheral blood smears.",
    "Other leukemias (AML, CLL, CML, T-lineage ALL) or any other disease: it only knows "
    "benign and three B-lineage ALL subtypes, and will name one of them whatever it sees.",
    "A particular age group: whether the training patients were children, adults or both is "
    "not recorded, so the scope by age is unknown.",
    "Images the service refers (out of the acquisition profile, or too uncertain for the "
    "conformal set): those go to the hematologist without an answer.",
)

LIMITATIONS: tuple[dict[str, str], ...] = (
    {"title": "Single source laboratory",
     "text": "Every training and test image comes from one laboratory (the public ALL "
             "peripheral blood smear set of Aria et al. 2021): one stain protocol, one "
             "microscope, one camera. How the model does under another laboratory's hand is "
             "unknown until images from other laboratories, labelled by flow cytometry, are "
             "measured."},
    {"title": "Classes confounded with acquisition batches",
     "text": "Each class was acquired in its own batch, with its own stain shade, "
             "illumination and background, and the red scale-bar text on some classes' images "
             "only. A random forest on a colour histogram reaches 0.98 test accuracy on the "
             "block split without a notion of cells: read every accuracy beside the shortcut "
             "audit."},
    {"title": "Image-level labels",
     "text": "Each image carries one label for the whole field; no single cell is annotated, "
             "so the model is never told which cells make the class."},
    {"title": "File-number blocks as a patient proxy",
     "text": "The dataset has no patient identifiers. Splits and hospital partitions keep "
             "blocks of consecutive file numbers together as a proxy for patients; one "
             "patient may still span two blocks and so appear on both sides of a split. The "
             "bootstrap intervals treat images as independent, which images of one patient "
             "are not: the true uncertainty is wider."},
    {"title": "Simulated laboratories are not real ones",
     "text": "Where hospitals have their own acquisition (leukofed.labs), it is a synthetic "
             "photometric transform of the same laboratory's images. Numbers on a simulated "
             "or unseen laboratory measure robustness to those transforms, not performance at "
             "a real other laboratory."},
)
MAIN_LIMITATION = ("single source laboratory, classes confounded with acquisition batches: "
                   "performance at any other laboratory is unknown")


# --------------------------------------------------------------------------- bootstrap


def _as_confusion(confusion: np.ndarray | list) -> np.ndarray:
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(f"a confusion matrix must be square and non-empty, got shape {cm.shape}")
    if not np.isfinite(cm).all() or (cm < 0).any() or (cm != np.round(cm)).any():
        raise ValueError("a confusion matrix holds non-negative whole counts")
    if cm.sum() == 0:
        raise ValueError("the confusion matrix is empty: no test images to measure")
    return cm.astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray, undefined: float) -> np.ndarray:
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    out = np.full(np.broadcast(num, den).shape, undefined)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _matrix_metrics(cms: np.ndarray, classes: tuple[str, ...], undefined: float
                    ) -> dict[str, np.ndarray]:
    """Metrics of a stack of confusion matrices (..., C, C), as leukofed.metrics defines them.

    ``undefined`` is what a recall, sensitivity or specificity over no images is: 0.0 for the
    point estimate (as leukofed.metrics says), NaN for a bootstrap draw (left out of the
    percentiles). F1 over no images is 0 either way, as in leukofed.metrics."""
    cms = cms.astype(np.float64)
    tp = np.diagonal(cms, axis1=-2, axis2=-1)
    support = cms.sum(axis=-1)
    predicted = cms.sum(axis=-2)
    total = support.sum(axis=-1)
    precision0 = _ratio(tp, predicted, 0.0)
    recall0 = _ratio(tp, support, 0.0)
    f1 = _ratio(2 * precision0 * recall0, precision0 + recall0, 0.0)
    recall = _ratio(tp, support, undefined)
    malignant = np.ones(len(classes), bool)
    malignant[BENIGN_INDEX] = False
    true_malignant = cms[..., malignant, :]
    true_benign = cms[..., BENIGN_INDEX, :]
    out = {
        "accuracy": _ratio(tp.sum(axis=-1), total, 0.0),
        "macro_f1": f1.mean(axis=-1),
    }
    for i, name in enumerate(classes):
        out[f"recall_{name}"] = recall[..., i]
    out["malignant_sensitivity"] = _ratio(true_malignant[..., malignant].sum(axis=(-2, -1)),
                                          true_malignant.sum(axis=(-2, -1)), undefined)
    out["malignant_specificity"] = _ratio(true_benign[..., BENIGN_INDEX],
                                          true_benign.sum(axis=-1), undefined)
    return out


def bootstrap_intervals(confusion: np.ndarray | list, n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95, classes: tuple[str, ...] = CLASSES
                        ) -> dict[str, dict[str, float]]:
    """Point estimates and percentile bootstrap intervals from a C x C confusion matrix alone.

    Resampling the N test images with replacement is a multinomial draw of N images over the
    matrix's cells with the observed cell shares, so each of ``n_boot`` draws is one numpy
    multinomial; no per-image data is needed. Keys: ``accuracy``, ``macro_f1``,
    ``recall_<Class>`` per class, ``malignant_sensitivity``, ``malignant_specificity``
    (malignant = any class but Benign); each ``{"value", "low", "high"}`` with ``value`` the
    metric on the matrix itself (as ``leukofed.metrics.classification_metrics`` computes it).
    A draw in which a recall's class (or all malignant, or all benign images) is missing is
    left out of that metric's percentiles; where every draw lacks it, low and high are NaN.
    Rows are true classes, columns predictions. Raises ValueError on an empty or malformed
    matrix."""
    cm = _as_confusion(confusion)
    if cm.shape[0] != len(classes):
        raise ValueError(f"a {cm.shape[0]}x{cm.shape[0]} confusion matrix for "
                         f"{len(classes)} classes")
    if n_boot < 1:
        raise ValueError("n_boot must be at least 1")
    if not 0.0 < level < 1.0:
        raise ValueError("level must be between 0 and 1")
    n = int(cm.sum())
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, cm.ravel() / n, size=n_boot).reshape(n_boot, *cm.shape)
    point = _matrix_metrics(cm, classes, undefined=0.0)
    boot = _matrix_metrics(draws, classes, undefined=float("nan"))
    tail = 100.0 * (1.0 - level) / 2.0
    out: dict[str, dict[str, float]] = {}
    for key, value in point.items():
        sample = boot[key][np.isfinite(boot[key])]
        if len(sample):
            low, high = np.percentile(sample, [tail, 100.0 - tail])
        else:
            low = high = float("nan")
        out[key] = {"value": float(value), "low": float(low), "high": float(high)}
    return out


# --------------------------------------------------------------------------- building


def finite_number(value: Any) -> float | None:
    """A finite float, or None (JSON has no NaN; the release gate reads cards with it too)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _int(value: Any) -> int | None:
    x = finite_number(value)
    return None if x is None else int(round(x))


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _not_measured(**extra: Any) -> dict[str, Any]:
    return {"measured": False, "note": NOT_MEASURED, **extra}


def _training(training: Mapping[str, Any] | None) -> dict[str, Any]:
    hospitals_in = (training or {}).get("hospitals") or {}
    if not hospitals_in:
        return _not_measured(partition=_str((training or {}).get("partition")))
    hospitals = []
    totals = {c: 0 for c in CLASSES}
    complete = True
    for name in sorted(hospitals_in, key=str):
        h = hospitals_in[name] or {}
        raw_counts = h.get("class_counts")
        counts = None
        if isinstance(raw_counts, Mapping):
            counts = {str(k): _int(v) or 0 for k, v in raw_counts.items()}
            for c in CLASSES:
                totals[c] += counts.get(c, 0)
        else:
            complete = False
        hospitals.append({"name": str(name), "num_examples": _int(h.get("num_examples")),
                          "class_counts": counts, "fingerprint": _str(h.get("fingerprint"))})
    examples = [h["num_examples"] for h in hospitals]
    return {
        "measured": True,
        "hospitals": hospitals,
        "total_examples": sum(examples) if None not in examples else None,
        "class_counts": totals if complete else None,
        "partition": _str((training or {}).get("partition")),
    }


def _federation(federation: Mapping[str, Any] | None) -> dict[str, Any]:
    if not federation:
        return _not_measured()
    privacy = federation.get("privacy")
    if isinstance(privacy, Mapping):
        privacy_out: dict[str, Any] | None = {"epsilon": finite_number(privacy.get("epsilon")),
                                              "delta": finite_number(privacy.get("delta"))}
        if privacy.get("level") == "example":
            # DP-SGD at each hospital: one training image is the unit; every hospital's own
            # spent epsilon (the run's is the largest of them).
            spent = privacy.get("hospitals")
            privacy_out.update(
                level="example", unit="one training image (docs/security.md)",
                hospitals={str(h): finite_number(v) for h, v in spent.items()}
                if isinstance(spent, Mapping) else {})
    else:
        privacy_out = None
    return {
        "measured": True,
        "strategy": _str(federation.get("strategy")),
        "rounds": _int(federation.get("rounds")),
        "round": _int(federation.get("round")),
        "privacy": privacy_out,
        "secure_aggregation": bool(federation.get("secure_aggregation", False)),
    }


def _metrics(test: Mapping[str, Any] | None, n_boot: int, seed: int, level: float
             ) -> dict[str, Any]:
    confusion = (test or {}).get("confusion")
    source = _str((test or {}).get("source"))
    if confusion is None or not np.asarray(confusion).size:
        return _not_measured(source=source)
    if not np.asarray(confusion, dtype=np.float64).sum():  # a matrix of zeros: no test images
        return _not_measured(source=source)
    cm = _as_confusion(confusion)
    intervals = bootstrap_intervals(cm, n_boot=n_boot, seed=seed, level=level)
    return {
        "measured": True,
        "source": source,
        "n_images": int(cm.sum()),
        "support": {c: int(s) for c, s in zip(CLASSES, cm.sum(axis=1))},
        "confusion": cm.tolist(),
        "level": float(level),
        "n_boot": int(n_boot),
        "seed": int(seed),
        "values": {k: {kk: finite_number(vv) for kk, vv in v.items()}
                   for k, v in intervals.items()},
    }


def _calibration(report: Mapping[str, Any] | None) -> dict[str, Any]:
    if not report:
        return _not_measured()
    keys = ("temperature", "ece_before", "ece_after", "classwise_ece_before",
            "classwise_ece_after", "nll_before", "nll_after", "test_ece_before",
            "test_ece_after")
    return {"measured": True, **{k: finite_number(report.get(k)) for k in keys}}


def _class_coverage(values: Any) -> dict[str, float | None] | None:
    if values is None:
        return None
    if isinstance(values, Mapping):
        return {str(k): finite_number(v) for k, v in values.items()}
    values = list(values)
    names = CLASSES if len(values) == len(CLASSES) else [str(i) for i in range(len(values))]
    return {name: finite_number(v) for name, v in zip(names, values)}


def _conformal(report: Mapping[str, Any] | None, test: Mapping[str, Any] | None
               ) -> dict[str, Any]:
    fitted = (report or {}).get("calibration") or {}
    target = finite_number(fitted.get("coverage")) if isinstance(fitted, Mapping) else None
    if test:
        achieved = finite_number(test.get("coverage"))
        class_cov = _class_coverage(test.get("class_coverage"))
        refer = finite_number(test.get("refer_share"))
        answered = finite_number(test.get("accuracy_answered"))
    else:
        achieved = finite_number((report or {}).get("test_coverage"))
        class_cov = _class_coverage((report or {}).get("test_class_coverage"))
        refer = answered = None
    if target is None and achieved is None:
        return _not_measured()
    return {"measured": True, "target": target, "achieved": achieved,
            "class_coverage": class_cov, "refer_share": refer, "accuracy_answered": answered}


def _audit_reading(a: Mapping[str, float | None], bound: float) -> list[str]:
    lines = []
    follow = a.get("audit_follow_colour")
    if follow is not None:
        verdict = ("within the bound: the model does not follow the stain" if follow <= bound
                   else "above the bound: the model reads stain, not cells; promote refuses it")
        target = " (target for the default recipe under 0.03)" if follow >= FOLLOW_COLOUR_TARGET \
            else ""
        lines.append(f"Follow-the-colour {follow:.3f} of recoloured test images are called the "
                     f"class whose stain they now wear (bound {bound:.2f}): {verdict}{target}.")
    original = a.get("audit_original_accuracy")
    for key, label, allowed in (
            ("audit_recoloured_accuracy", "Recoloured to another class's stain",
             RECOLOURED_TARGET_POINTS),
            ("audit_spatial_accuracy", "Cells and background recoloured apart",
             SPATIAL_TARGET_POINTS)):
        value = a.get(key)
        if value is None or original is None:
            continue
        drop = original - value
        reading = (f"within {allowed:.2f} of original: the answer barely depends on stain"
                   if drop <= allowed else
                   f"{drop:.3f} below original: that much of the score is stain, not cells")
        lines.append(f"{label}: accuracy {value:.3f} vs original {original:.3f}, {reading}.")
    background = a.get("audit_background_only_accuracy")
    if background is not None:
        reading = ("about chance: with the cells painted over little signal is left"
                   if background <= BACKGROUND_CHANCE + 0.05 else
                   "above chance: some signal survives with the cells painted over (such "
                   "images have no stained cell and are referred in service)")
        lines.append(f"Background only: accuracy {background:.3f} against chance "
                     f"{BACKGROUND_CHANCE:.2f}, {reading}.")
    histogram = a.get("audit_histogram_accuracy")
    if histogram is not None:
        lines.append(f"Colour alone (a histogram random forest on the same split) reaches "
                     f"{histogram:.3f}: the bar every accuracy on this dataset is read against.")
    worst = a.get("audit_worst_macro_f1")
    if worst is not None:
        lines.append(f"Worse of original and recoloured macro-F1: {worst:.3f} (what promote "
                     f"best ranks by).")
    return lines


def _audit(audit: Mapping[str, Any] | None, bound: float) -> dict[str, Any]:
    metrics = {str(k): finite_number(v) for k, v in (audit or {}).items()
               if str(k).startswith("audit_")}
    if not metrics:
        return _not_measured(max_follow_colour=bound)
    follow = metrics.get("audit_follow_colour")
    return {"measured": True, "metrics": metrics, "max_follow_colour": bound,
            "passes": None if follow is None else bool(follow <= bound),
            "reading": _audit_reading(metrics, bound)}


def _pair(value: Any) -> list[float | None] | None:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    return [finite_number(value[0]), finite_number(value[1])]


def _membership(report: Mapping[str, Any] | None) -> dict[str, Any]:
    """The membership-inference audit (leukofed.membership.attack_report), as the card
    keeps it: the strongest attack's numbers at top level, each attack's beside them."""
    if not isinstance(report, Mapping) or finite_number(report.get("auc")) is None:
        return _not_measured()
    from leukofed.membership import reading

    auc = finite_number(report.get("auc"))
    out: dict[str, Any] = {
        "measured": True, "attack": _str(report.get("attack")),
        "attack_text": _str(report.get("attack_text")),
        "auc": auc, "auc_interval": _pair(report.get("auc_interval")),
        "members": _int(report.get("members")), "nonmembers": _int(report.get("nonmembers")),
        "hospitals": _int(report.get("hospitals")),
        "advantage": finite_number(report.get("advantage")),
        "level": finite_number(report.get("level")),
        "reading": reading(auc),
    }
    for key in ("1pct", "0p1pct"):
        out[f"tpr_at_{key}_fpr"] = finite_number(report.get(f"tpr_at_{key}_fpr"))
        out[f"tpr_at_{key}_fpr_interval"] = _pair(report.get(f"tpr_at_{key}_fpr_interval"))
        out[f"tpr_at_{key}_fpr_resolved"] = bool(report.get(f"tpr_at_{key}_fpr_resolved"))
    attacks = report.get("attacks")
    out["attacks"] = {str(name): {
        "auc": finite_number(a.get("auc")), "auc_interval": _pair(a.get("auc_interval")),
        "tpr_at_1pct_fpr": finite_number(a.get("tpr_at_1pct_fpr")),
        "members": _int(a.get("members")), "nonmembers": _int(a.get("nonmembers"))}
        for name, a in (attacks.items() if isinstance(attacks, Mapping) else ())
        if isinstance(a, Mapping)}
    return out


def _referral(info: Mapping[str, Any]) -> dict[str, Any]:
    share = finite_number(info.get("referred_share"))
    profile_images = _int(info.get("acquisition_profile_images"))
    if share is None and profile_images is None:
        return _not_measured()
    return {"measured": True, "referred_share": share,
            "acquisition_profile_images": profile_images}


def with_version(card: dict[str, Any], version: str) -> dict[str, Any]:
    """A copy of ``card`` naming ``version``: a card is built before the registry numbers
    the version it describes ("round 3"), and shown with the number afterwards."""
    return {**card, "model": {**(card.get("model") or {}), "version": str(version)}}


def build_card(info: dict[str, Any], n_boot: int = 1000, seed: int = 0, level: float = 0.95,
               max_follow_colour: float = DEFAULT_MAX_FOLLOW_COLOUR) -> dict[str, Any]:
    """The structured, JSON-able card of one version (``"format": CARD_FORMAT``).

    ``info`` needs ``model_name`` and ``version``; every other key is optional and a section
    without numbers says ``"measured": False`` and ``"note": NOT_MEASURED``. The metrics and
    their intervals are computed from ``info["test"]["confusion"]``; every other number is
    copied as given (NaN becomes None)."""
    name, version = info.get("model_name"), info.get("version")
    if name in (None, "") or version in (None, ""):
        raise ValueError("a model card needs model_name and version")
    recipe = info.get("recipe")
    return {
        "format": CARD_FORMAT,
        "model": {
            "name": str(name),
            "version": str(version),
            "run_id": _str(info.get("run_id")),
            "created": _str(info.get("created")),
            "architecture": _str(info.get("model")),
            "image_size": _int(info.get("image_size")),
            "recipe": ({str(k): v if isinstance(v, (bool, int, float, str)) or v is None
                        else str(v) for k, v in recipe.items()}
                       if isinstance(recipe, Mapping) else None),
        },
        "classes": list(CLASSES),
        "intended_use": INTENDED_USE,
        "not_for": list(NOT_FOR),
        "training": _training(info.get("training")),
        "federation": _federation(info.get("federation")),
        "metrics": _metrics(info.get("test"), n_boot, seed, level),
        "calibration": _calibration(info.get("calibration")),
        "conformal": _conformal(info.get("calibration"), info.get("conformal_test")),
        "audit": _audit(info.get("audit"), float(max_follow_colour)),
        "membership": _membership(info.get("membership")),
        "referral": _referral(info),
        "limitations": [dict(item) for item in LIMITATIONS],
        "main_limitation": MAIN_LIMITATION,
    }


# --------------------------------------------------------------------------- rendering

_METRIC_LABELS = {
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "malignant_sensitivity": "malignant sensitivity (any class but Benign)",
    "malignant_specificity": "malignant specificity (Benign called Benign)",
    **{f"recall_{c}": f"recall {DISPLAY_NAMES.get(c, c)}" for c in CLASSES},
}




def _f(value: Any, digits: int = 3) -> str:
    x = finite_number(value)
    return "n/a" if x is None else f"{x:.{digits}f}"


def _g(value: Any) -> str:
    x = finite_number(value)
    return "n/a" if x is None else f"{x:g}"


def _ci(entry: Mapping[str, Any] | None) -> str:
    """``value [low, high]`` with 3 decimals."""
    if not entry:
        return "n/a"
    return f"{_f(entry.get('value'))} [{_f(entry.get('low'))}, {_f(entry.get('high'))}]"


def _text(value: Any) -> str:
    return "not recorded" if value in (None, "") else str(value)


def _metric_order(values: Mapping[str, Any]) -> list[str]:
    known = [k for k in _METRIC_LABELS if k in values]
    return known + sorted(k for k in values if k not in _METRIC_LABELS)


def _sections(card: Mapping[str, Any]) -> list[tuple[str, list[tuple[str, Any]]]]:
    """The card as (heading, blocks), each block ("p", text), ("list", [text]) or
    ("table", (header, rows)): one structure both Markdown and HTML render."""
    model = card.get("model") or {}
    sections: list[tuple[str, list[tuple[str, Any]]]] = []

    recipe = model.get("recipe")
    recipe_text = (", ".join(f"{k}={v}" for k, v in recipe.items()) if recipe
                   else "not recorded")
    sections.append(("Model", [("table", (["", ""], [
        ["name", _text(model.get("name"))],
        ["version", _text(model.get("version"))],
        ["run", _text(model.get("run_id"))],
        ["created", _text(model.get("created"))],
        ["architecture", _text(model.get("architecture"))],
        ["image size (px)", _text(model.get("image_size"))],
        ["recipe", recipe_text],
        ["card format", _text(card.get("format"))],
    ]))]))
    sections.append(("Intended use", [("p", card.get("intended_use", INTENDED_USE))]))
    sections.append(("Not for", [("list", list(card.get("not_for", NOT_FOR)))]))

    tr = card.get("training") or {}
    blocks: list[tuple[str, Any]] = []
    if tr.get("measured"):
        header = ["hospital", "images", *(DISPLAY_NAMES.get(c, c) for c in CLASSES),
                  "data fingerprint"]
        rows = []
        for h in tr.get("hospitals", []):
            counts = h.get("class_counts")
            rows.append([h.get("name"), _text(h.get("num_examples")),
                         *(("-" if counts is None else str(counts.get(c, 0)))
                           for c in CLASSES),
                         _text(h.get("fingerprint"))])
        totals = tr.get("class_counts")
        rows.append(["all hospitals", _text(tr.get("total_examples")),
                     *(("-" if totals is None else str(totals.get(c, 0))) for c in CLASSES),
                     ""])
        blocks.append(("table", (header, rows)))
    else:
        blocks.append(("p", f"Training data: {NOT_MEASURED}."))
    blocks.append(("p", f"Partition: {_text(tr.get('partition'))}."))
    sections.append(("Training data", blocks))

    fed = card.get("federation") or {}
    if fed.get("measured"):
        privacy = fed.get("privacy")
        privacy_text = ("none (no differential privacy)" if not privacy else
                        f"differential privacy, epsilon {_f(privacy.get('epsilon'), 2)}, "
                        f"delta {_g(privacy.get('delta'))}")
        if privacy and privacy.get("level") == "example":
            spent = ", ".join(f"{h} {_f(e, 2)}" for h, e in
                              sorted((privacy.get("hospitals") or {}).items()))
            privacy_text = (f"example-level differential privacy (DP-SGD at each hospital; "
                            f"the unit is one training image, not one patient): epsilon "
                            f"{_f(privacy.get('epsilon'), 2)} (the largest hospital's), delta "
                            f"{_g(privacy.get('delta'))}; per hospital: {spent or 'none'}")
        sections.append(("Federation", [("table", (["", ""], [
            ["strategy", _text(fed.get("strategy"))],
            ["round of this version", f"{_text(fed.get('round'))} of {_text(fed.get('rounds'))}"],
            ["privacy", privacy_text],
            ["secure aggregation", "yes" if fed.get("secure_aggregation") else "no"],
        ]))]))
    else:
        sections.append(("Federation", [("p", f"Federation: {NOT_MEASURED}.")]))

    met = card.get("metrics") or {}
    if met.get("measured"):
        level = float(met.get("level", 0.95))
        values = met.get("values") or {}
        rows = [[_METRIC_LABELS.get(k, k), _ci(values[k])] for k in _metric_order(values)]
        support = met.get("support") or {}
        blocks = [
            ("p", f"On {met.get('n_images')} test images ({_text(met.get('source'))}); "
                  f"{level:.0%} percentile bootstrap intervals over images from the confusion "
                  f"matrix ({met.get('n_boot')} draws, seed {met.get('seed')}). Images of one "
                  f"patient are not independent, so the true intervals are wider."),
            ("table", (["metric", f"value [{level:.0%} CI]"], rows)),
            ("p", "Test images per class: " + ", ".join(
                f"{DISPLAY_NAMES.get(c, c)} {n}" for c, n in support.items()) + "."),
        ]
        confusion = met.get("confusion")
        if confusion:
            names = [DISPLAY_NAMES.get(c, c) for c in card.get("classes", CLASSES)]
            if len(names) != len(confusion):
                names = [str(i) for i in range(len(confusion))]
            blocks.append(("table", (["true \\ predicted", *names],
                                     [[n, *(str(v) for v in row)]
                                      for n, row in zip(names, confusion)])))
        sections.append(("Metrics", blocks))
    else:
        sections.append(("Metrics", [("p", f"Test metrics: {NOT_MEASURED}.")]))

    cal = card.get("calibration") or {}
    if cal.get("measured"):
        rows = [["expected calibration error (validation)", _f(cal.get("ece_before")),
                 _f(cal.get("ece_after"))],
                ["class-wise ECE (validation)", _f(cal.get("classwise_ece_before")),
                 _f(cal.get("classwise_ece_after"))],
                ["negative log-likelihood (validation)", _f(cal.get("nll_before")),
                 _f(cal.get("nll_after"))],
                ["expected calibration error (test)", _f(cal.get("test_ece_before")),
                 _f(cal.get("test_ece_after"))]]
        sections.append(("Calibration", [
            ("p", f"Temperature scaling, temperature {_f(cal.get('temperature'))}."),
            ("table", (["", "before", "after"], rows)),
        ]))
    else:
        sections.append(("Calibration", [("p", f"Calibration: {NOT_MEASURED}.")]))

    conf = card.get("conformal") or {}
    if conf.get("measured"):
        rows = [["coverage target", _f(conf.get("target"))],
                ["coverage achieved on test", _f(conf.get("achieved"))],
                ["referred as uncertain (refer share)", _f(conf.get("refer_share"))],
                ["accuracy on the answered images", _f(conf.get("accuracy_answered"))]]
        for c, v in (conf.get("class_coverage") or {}).items():
            rows.append([f"coverage {DISPLAY_NAMES.get(c, c)}", _f(v)])
        sections.append(("Conformal prediction sets", [
            ("p", "A prediction set per image that should hold the true class at the target "
                  "rate; an image whose set is not a single class is referred."),
            ("table", (["", ""], rows)),
        ]))
    else:
        sections.append(("Conformal prediction sets",
                         [("p", f"Conformal coverage: {NOT_MEASURED}.")]))

    audit = card.get("audit") or {}
    bound = float(audit.get("max_follow_colour", DEFAULT_MAX_FOLLOW_COLOUR))
    if audit.get("measured"):
        m = audit.get("metrics") or {}
        rows = [[label, _f(m.get(a)), _f(m.get(f))] for label, a, f in AUDIT_ROWS]
        rows.append([f"answers following the new colour (bound {bound:.2f})",
                     _f(m.get("audit_follow_colour")), ""])
        verdict = {True: "passes", False: "fails", None: "cannot be judged"}[audit.get("passes")]
        sections.append(("Stain (shortcut) audit", [
            ("p", f"The version {verdict} the follow-the-colour bound of {bound:.2f} on "
                  f"{_text(_int(m.get('audit_images')))} test images."),
            ("table", (["shortcut audit", "accuracy", "macro-F1"], rows)),
            ("list", list(audit.get("reading") or [])),
        ]))
    else:
        sections.append(("Stain (shortcut) audit",
                         [("p", f"Shortcut audit: {NOT_MEASURED}.")]))

    sections.append(("Membership inference (privacy audit)", _membership_blocks(card)))

    ref = card.get("referral") or {}
    if ref.get("measured"):
        sections.append(("Out-of-distribution referral", [("table", (["", ""], [
            ["test images referred (outside the acquisition profile)",
             _f(ref.get("referred_share"))],
            ["training images in the acquisition profile",
             _text(ref.get("acquisition_profile_images"))],
        ]))]))
    else:
        sections.append(("Out-of-distribution referral",
                         [("p", f"Out-of-distribution referral: {NOT_MEASURED}.")]))

    sections.append(("Known limitations", [("list", [
        f"{item.get('title')}. {item.get('text')}" for item in card.get("limitations", [])])]))
    return sections


def _interval_text(value: Any, interval: Any) -> str:
    low, high = interval if isinstance(interval, (list, tuple)) and len(interval) == 2 \
        else (None, None)
    return f"{_f(value)} [{_f(low)}, {_f(high)}]"


def _membership_blocks(card: Mapping[str, Any]) -> list[tuple[str, Any]]:
    mem = card.get("membership") or {}
    if not mem.get("measured"):
        return [("p", f"Membership-inference audit: {NOT_MEASURED}.")]
    level = finite_number(mem.get("level")) or 0.95
    rows = [["AUC (0.5: a coin)", _interval_text(mem.get("auc"), mem.get("auc_interval"))]]
    for key, label in (("1pct", "1%"), ("0p1pct", "0.1%")):
        note = "" if mem.get(f"tpr_at_{key}_fpr_resolved") else \
            " (too few non-members to resolve: read at zero false positives)"
        rows.append([f"true-positive rate at {label} false-positive rate{note}",
                     _interval_text(mem.get(f"tpr_at_{key}_fpr"),
                                    mem.get(f"tpr_at_{key}_fpr_interval"))])
    rows.append(["membership advantage (max TPR - FPR)", _f(mem.get("advantage"))])
    attacks = [[name, _interval_text(a.get("auc"), a.get("auc_interval")),
                _f(a.get("tpr_at_1pct_fpr")), _text(a.get("members")),
                _text(a.get("nonmembers"))]
               for name, a in (mem.get("attacks") or {}).items()]
    return [
        ("p", f"{str(mem.get('reading', '')).capitalize()}."),
        ("p", f"Attack: {_text(mem.get('attack'))}, {_text(mem.get('attack_text'))}, the "
              f"stronger of the attacks tried. Members: {_text(mem.get('members'))} training "
              f"images; non-members: {_text(mem.get('nonmembers'))} validation and test "
              f"images, from {_text(mem.get('hospitals'))} hospitals, pooled from per-"
              f"hospital histograms (no per-image number left a hospital). {level:.0%} "
              "bootstrap intervals over the pooled bins."),
        ("table", (["", f"value [{level:.0%} CI]"], rows)),
        ("table", (["attack", "AUC", "TPR at 1% FPR", "members", "non-members"], attacks)),
    ]


def _md(value: Any) -> str:
    """Text safe inside a Markdown table cell and inert as HTML."""
    text = str(value).replace("\r", " ").replace("\n", " ")
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")


def card_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown: one heading per section, tables of ``value [low, high]``."""
    model = card.get("model") or {}
    lines = [f"# Model card: {_md(model.get('name'))} version {_md(model.get('version'))}", ""]
    for heading, blocks in _sections(card):
        lines += [f"## {heading}", ""]
        for kind, body in blocks:
            if kind == "p":
                lines += [_md(body), ""]
            elif kind == "list":
                lines += [f"- {_md(item)}" for item in body] + [""]
            else:
                header, rows = body
                lines.append("| " + " | ".join(_md(h) for h in header) + " |")
                lines.append("|" + "---|" * len(header))
                lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
    "color:#222;line-height:1.45}"
    "table{border-collapse:collapse;margin:.5rem 0 1rem}"
    "th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left;vertical-align:top}"
    "th{background:#f3f3f3}h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;"
    "border-bottom:1px solid #ddd}"
)


def card_html(card: dict[str, Any]) -> str:
    """The card as one standalone HTML page: inline CSS, no scripts, every value escaped."""
    e = html.escape
    model = card.get("model") or {}
    title = f"Model card: {model.get('name')} version {model.get('version')}"
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{e(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
           f"<h1>{e(title)}</h1>"]
    for heading, blocks in _sections(card):
        out.append(f"<h2>{e(heading)}</h2>")
        for kind, body in blocks:
            if kind == "p":
                out.append(f"<p>{e(str(body))}</p>")
            elif kind == "list":
                out.append("<ul>" + "".join(f"<li>{e(str(i))}</li>" for i in body) + "</ul>")
            else:
                header, rows = body
                out.append("<table>")
                if any(header):
                    out.append("<tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header)
                               + "</tr>")
                out += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>"
                        for row in rows]
                out.append("</table>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def card_summary(card: dict[str, Any]) -> str:
    """Eight plain lines for ``leukofed promote`` to print before it moves an alias."""
    model = card.get("model") or {}
    met = card.get("metrics") or {}
    lines = [f"model card {model.get('name')} version {model.get('version')}"]
    if met.get("measured"):
        values = met.get("values") or {}
        level = float(met.get("level", 0.95))
        lines.append(f"accuracy {_ci(values.get('accuracy'))} ({level:.0%} CI, "
                     f"{met.get('n_images')} test images, {_text(met.get('source'))})")
        lines.append(f"malignant sensitivity {_ci(values.get('malignant_sensitivity'))}, "
                     f"specificity {_ci(values.get('malignant_specificity'))}")
    else:
        lines.append(f"test metrics: {NOT_MEASURED}")
    cal = card.get("calibration") or {}
    conf = card.get("conformal") or {}
    if cal.get("measured"):
        lines.append(f"ECE {_f(cal.get('ece_before'))} -> {_f(cal.get('ece_after'))} "
                     f"(temperature {_f(cal.get('temperature'))})")
    else:
        lines.append(f"calibration: {NOT_MEASURED}")
    if conf.get("measured"):
        lines.append(f"coverage {_f(conf.get('achieved'))} achieved vs "
                     f"{_f(conf.get('target'))} target, refer share "
                     f"{_f(conf.get('refer_share'))}")
    else:
        lines.append(f"conformal coverage: {NOT_MEASURED}")
    audit = card.get("audit") or {}
    if audit.get("measured"):
        m = audit.get("metrics") or {}
        bound = float(audit.get("max_follow_colour", DEFAULT_MAX_FOLLOW_COLOUR))
        verdict = {True: "passes", False: "FAILS", None: "not judged"}[audit.get("passes")]
        lines.append(f"audit: follow-the-colour {_f(m.get('audit_follow_colour'))} "
                     f"(bound {bound:.2f}, {verdict}); recoloured "
                     f"{_f(m.get('audit_recoloured_accuracy'))} vs original "
                     f"{_f(m.get('audit_original_accuracy'))}")
    else:
        lines.append(f"shortcut audit: {NOT_MEASURED}")
    mem = card.get("membership") or {}
    if mem.get("measured"):
        lines.append(f"membership audit ({mem.get('attack')}): AUC "
                     f"{_interval_text(mem.get('auc'), mem.get('auc_interval'))}, TPR at 1% "
                     f"FPR {_f(mem.get('tpr_at_1pct_fpr'))} ({mem.get('members')} members, "
                     f"{mem.get('nonmembers')} non-members): {mem.get('reading')}")
    else:
        lines.append(f"membership audit: {NOT_MEASURED}")
    lines.append(f"main limitation: {card.get('main_limitation', MAIN_LIMITATION)}")
    return "\n".join(lines)
