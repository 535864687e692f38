"""What an answer says beyond the raw scores: calibration, prediction set, malignant, refer.

A model version may carry in its leukofed metadata:

- ``calibration`` (``leukofed.calibration.Calibration.to_dict()``): a temperature and one
  conformal threshold per class. Answers then carry the *calibrated* probabilities
  (``softmax(log p / T)``; the top class never changes) and a prediction set: every class
  with ``1 - p_k <= q_k``, which holds the true class at the target coverage (for example
  95%) for every class separately. A set of one class is a usable answer; a set of two
  or more classes means the model cannot tell them apart on this image, and an empty set
  that no class fits: both are referred to a hematologist, like an image unlike the
  training images (``model_source.Referral``).
- ``card`` (``leukofed.card.build_card``): the version's model card, served rendered.

A missing or malformed calibration or card never stops serving: it is logged once, when
the version loads, and every answer says why there is none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from leukofed.calibration import Calibration
from leukofed.labels import BENIGN_INDEX, CLASSES

if TYPE_CHECKING:
    from .model_source import Referral

log = logging.getLogger(__name__)

BENIGN = CLASSES[BENIGN_INDEX]
YES, NO, UNSURE = "yes", "no", "unsure"
NO_CALIBRATION = ("this model version carries no calibration: the probabilities are the "
                  "model's raw scores and there is no prediction set")
NO_CARD = "this model version carries no model card"
CARD_FORMAT = "leukofed-model-card/1"


def _why(exc: Exception) -> str:
    return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__


def load_calibration(metadata: dict[str, Any], version: str = "?"
                     ) -> tuple[Calibration | None, str]:
    """The version's calibration, or None and why it is unavailable (logged here, once
    per loaded version). A malformed one is treated as absent: it never stops serving."""
    raw = metadata.get("calibration")
    if raw is None:
        log.info("version %s carries no calibration; serving raw probabilities without "
                 "prediction sets", version)
        return None, NO_CALIBRATION
    try:
        calibration = Calibration.from_dict(raw)
        n = len(metadata["classes"])
        if len(calibration.quantiles) != n:
            raise ValueError(f"{len(calibration.quantiles)} quantiles for {n} classes")
        probe = np.full((1, n), 1.0 / n)
        calibration.calibrate(probe)  # one dry run: it cannot fail later on shapes
        calibration.sets(probe)
    except Exception as exc:
        log.error("version %s has a malformed calibration (%s: %s); serving it with raw "
                  "probabilities and no prediction sets", version, type(exc).__name__, exc)
        return None, (f"this model version's calibration is malformed ({_why(exc)}): the "
                      "probabilities are the model's raw scores and there is no prediction "
                      "set")
    return calibration, ""


@dataclass(frozen=True)
class ModelCard:
    """A version's model card, rendered once when the version loads."""

    data: dict[str, Any]
    markdown: str
    html: str
    summary: str


def load_card(metadata: dict[str, Any], version: str = "?") -> tuple[ModelCard | None, str]:
    """The version's model card, or None and why there is none (a malformed card is
    logged once and treated as absent)."""
    raw = metadata.get("card")
    if raw is None:
        return None, NO_CARD
    try:
        from leukofed import card as cards

        if not isinstance(raw, dict):
            raise ValueError(f"a model card is a mapping, got {type(raw).__name__}")
        if raw.get("format") != CARD_FORMAT:
            raise ValueError(f"card format must be {CARD_FORMAT!r}, got {raw.get('format')!r}")
        if version != "?":  # the card is written before the registry numbers the version
            raw = cards.with_version(raw, version)
        card = ModelCard(raw, cards.card_markdown(raw), cards.card_html(raw),
                         cards.card_summary(raw))
    except Exception as exc:
        log.error("version %s has a malformed model card (%s: %s); serving it without one",
                  version, type(exc).__name__, exc)
        return None, f"this model version's model card is malformed ({_why(exc)})"
    return card, ""


def percent(coverage: float) -> str:
    """0.95 -> '95%', 0.975 -> '97.5%'."""
    return f"{100 * coverage:.4g}%"


def joined(names: tuple[str, ...] | list[str]) -> str:
    """('Pre',) -> 'Pre'; ('Pre', 'Pro') -> 'Pre and Pro'; three -> 'A, B and C'."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def malignant(prediction_set: tuple[str, ...] | None, label: str) -> str:
    """'yes': every class in the set is malignant; 'no': the set is exactly {Benign};
    'unsure' otherwise (an empty set too). Without a set: the top label decides."""
    if prediction_set is None:
        return NO if label == BENIGN else YES
    if not prediction_set:
        return UNSURE
    if BENIGN not in prediction_set:
        return YES
    return NO if len(prediction_set) == 1 else UNSURE


def set_reason(prediction_set: tuple[str, ...], coverage: float) -> str:
    """Why a set that is not a single class means "refer", in words."""
    level = percent(coverage)
    if not prediction_set:
        return (f"the {level} prediction set is empty: no class fits this image well "
                "enough for the model to name one")
    return (f"the {level} prediction set holds {joined(prediction_set)}: the model cannot "
            "tell them apart here")


def set_advice(prediction_set: tuple[str, ...], coverage: float) -> str:
    level = percent(coverage)
    if not prediction_set:
        return (f"Refer to a hematologist: no class enters the model's {level} prediction "
                "set for this image, so the model has no reliable answer; its label must "
                "not be used.")
    return (f"Refer to a hematologist: the model cannot tell {joined(prediction_set)} apart "
            f"on this image (its {level} prediction set holds them all), so its label must "
            "not be used on its own.")


@dataclass(frozen=True)
class Answer:
    """Everything one prediction says, in the API's terms."""

    label: str
    probabilities: np.ndarray  # calibrated when ``calibrated``
    calibrated: bool
    temperature: float | None
    coverage: float | None
    calibration_note: str | None
    prediction_set: tuple[str, ...] | None
    set_mask: np.ndarray | None  # (C,) bool, in class order
    malignant: str
    in_distribution: bool | None
    ood_distance: float | None
    refer: bool | None
    reasons: tuple[str, ...]
    advice: str

    def fields(self, classes: list[str]) -> dict[str, Any]:
        """The v1 prediction fields (all but the filename)."""
        return {
            "label": self.label,
            "probabilities": {c: float(p) for c, p in zip(classes, self.probabilities)},
            "calibrated": self.calibrated, "temperature": self.temperature,
            "coverage": self.coverage, "calibration_note": self.calibration_note,
            "prediction_set": (None if self.prediction_set is None
                               else list(self.prediction_set)),
            "malignant": self.malignant,
            "in_distribution": self.in_distribution, "refer": self.refer,
            "refer_reasons": list(self.reasons), "ood_distance": self.ood_distance,
            "advice": self.advice,
        }


def answers(classes: list[str], probs: np.ndarray, referrals: list[Referral],
            calibration: Calibration | None, note: str) -> list[Answer]:
    """One Answer per image from the model's RAW probabilities (N, C) and the
    out-of-distribution verdicts. ``note``: why there is no calibration (when none)."""
    raw = np.asarray(probs, np.float64).reshape(len(referrals), len(classes))
    calibrated = masks = None
    if calibration is not None:
        try:
            calibrated, masks = calibration.calibrate(raw), calibration.sets(raw)
        except Exception as exc:  # never lose the answer: serve it uncalibrated
            log.exception("calibration failed on a batch; answering with raw probabilities")
            calibration, calibrated, masks = None, None, None
            note = (f"the calibration failed on this request ({type(exc).__name__}): the "
                    "probabilities are the model's raw scores and there is no prediction set")
    out = []
    for i, referral in enumerate(referrals):
        # The top class is the raw one (what the heat map explains); T > 0 keeps the order.
        label = classes[int(np.argmax(raw[i]))]
        if calibration is None or masks is None or calibrated is None:
            out.append(Answer(
                label, raw[i], False, None, None, note, None, None,
                malignant(None, label), referral.in_distribution, referral.distance,
                referral.refer, referral.reasons, referral.advice))
            continue
        mask = np.asarray(masks[i], bool)
        pset = tuple(c for c, m in zip(classes, mask) if m)
        ambiguous = len(pset) != 1
        reasons = referral.reasons
        if referral.refer is True:  # unlike the training images: that says the most
            refer, advice = True, referral.advice
        elif ambiguous:
            refer, advice = True, set_advice(pset, calibration.coverage)
        else:
            refer, advice = referral.refer, referral.advice
        if ambiguous:
            reasons = (*reasons, set_reason(pset, calibration.coverage))
        out.append(Answer(
            label, calibrated[i], True, calibration.temperature, calibration.coverage, None,
            pset, mask, malignant(pset, label), referral.in_distribution, referral.distance,
            refer, reasons, advice))
    return out
