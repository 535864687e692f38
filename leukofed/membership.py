"""A membership-inference audit of a model version, computed federatedly.

The question a data-protection officer asks: can someone who holds this model and a smear
image tell whether that image was in the training set? The audit plays that attacker.
Each hospital scores the global model on its own *members* (a fixed sample of its training
split) and *non-members* (its own validation and test splits, never trained on) and sends
only **histograms** of an attack statistic on fixed bin edges (``hospital_histograms``).
Histograms on the same edges add exactly, so the aggregator's pooled histograms
(``add_histograms``) are what one hospital holding every image would send, and the attack's
ROC curve is read from them (``attack_report``): no per-image number leaves a hospital.

Attacks (a lower statistic says "member"):

- ``loss``: the per-image cross-entropy of the served probabilities, ``-log p_y``
  (Yeom et al. 2018). A model that memorised an image has a near-zero loss on it.
- ``loss_ratio``: ``log10(loss now / loss under a reference model)``, the reference being
  the global model of an earlier round (``RoundConfig.membership_reference_round``). This
  is difficulty calibration (Watson et al. 2022): an image that is easy for every model has
  a low loss whether or not it was trained on; dividing by its loss under the reference
  removes that, leaving how much *this* image's loss fell as training went on, which is
  larger for an image the model trained on than for one it only generalises to. The hospital
  keeps the reference losses of its own images in memory; they never leave it.

The headline is the stronger of the two (the higher AUC): an audit reports the worst case it
found. Numbers: the AUC (the probability that the attacker, shown one member and one
non-member, ranks the member as the member; 0.5 is a coin), the true-positive rate at 1% and
0.1% false-positive rate (Carlini et al. 2022: what matters is whether *some* images are
exposed with confidence, not the average), the membership advantage max(TPR - FPR), and
95% percentile bootstrap intervals over the pooled bins (members and non-members resampled
from their histograms, as the card's metrics resample a confusion matrix).

Binning error: images in one bin count as ties (half a correct ranking), so the pooled AUC
differs from the per-image AUC (``auc_from_scores``) by at most half the share of
member/non-member pairs that share a bin (``auc_binning_bound``); thresholds are bin edges,
so a TPR at a given FPR is the best achievable with an edge threshold (conservative).

Pure numpy, no I/O; every dict is JSON-able.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

FORMAT = "leukofed-membership/1"
# (low, high, bins) of the statistic's coordinate: log10(loss) for "loss", log10(loss /
# reference loss) for "loss_ratio". 40 bins a decade; values outside fall in the end bins.
ATTACKS: dict[str, tuple[float, float, int]] = {
    "loss": (-8.0, 3.0, 440),
    "loss_ratio": (-11.0, 11.0, 880),
}
ATTACK_TEXT = {
    "loss": "per-image loss threshold (Yeom et al. 2018)",
    "loss_ratio": "loss relative to the same image's loss under an earlier round's model "
                  "(difficulty-calibrated, Watson et al. 2022)",
}
LOSS_FLOOR = 1e-8  # float32 probabilities resolve 1 - p to about 6e-8: below is "zero loss"
_P_FLOOR = 1e-12
FPRS = {"1pct": 0.01, "0p1pct": 0.001}  # false-positive rates read (key: metric suffix)
DEFAULT_IMAGES = 512  # training images a hospital scores as members (RunConfig)
# A suggested release ceiling on the audit's AUC (leukofed.gate, off by default).
SUGGESTED_MAX_AUC = 0.60


def edges(attack: str) -> np.ndarray:
    """The attack's shared bin edges (in its coordinate), bins closed on the right."""
    low, high, bins = ATTACKS[attack]
    return np.linspace(low, high, bins + 1)


def per_image_loss(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``-log p_y`` of each image, from (N, C) probabilities and integer labels."""
    p = np.asarray(probs, np.float64)
    labels = np.asarray(y, np.int64).reshape(-1)
    if p.ndim != 2 or len(p) != len(labels):
        raise ValueError(f"probs must be (N, C) with N = {len(labels)} labels, got {p.shape}")
    if not len(labels):
        return np.zeros(0)
    return -np.log(np.clip(p[np.arange(len(labels)), labels], _P_FLOOR, 1.0))


def statistic(attack: str, loss: np.ndarray, reference: np.ndarray | None = None
              ) -> np.ndarray:
    """The attack's per-image coordinate (lower: more likely a member)."""
    lo = np.log10(np.maximum(np.asarray(loss, np.float64), LOSS_FLOOR))
    if attack == "loss":
        return lo
    if attack == "loss_ratio":
        if reference is None or np.shape(reference) != np.shape(loss):
            raise ValueError("loss_ratio needs one reference loss per image")
        return lo - np.log10(np.maximum(np.asarray(reference, np.float64), LOSS_FLOOR))
    raise ValueError(f"unknown attack {attack!r}; known: {sorted(ATTACKS)}")


def histogram(attack: str, values: np.ndarray) -> np.ndarray:
    """Counts of ``values`` (the attack's coordinate) on its shared, right-closed bins."""
    e = edges(attack)
    v = np.asarray(values, np.float64).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise ValueError("attack statistics must be finite")
    idx = np.searchsorted(e[1:-1], v, side="left")
    return np.bincount(idx, minlength=len(e) - 1).astype(np.int64)


def hospital_histograms(member_loss: np.ndarray, nonmember_loss: np.ndarray,
                        member_reference: np.ndarray | None = None,
                        nonmember_reference: np.ndarray | None = None,
                        reference_round: int | None = None) -> dict[str, Any]:
    """What one hospital sends: per attack, the member and non-member histograms.
    ``loss_ratio`` only when reference losses (of the same images, same order) are given."""
    attacks = {"loss": {
        "members": histogram("loss", statistic("loss", member_loss)).tolist(),
        "nonmembers": histogram("loss", statistic("loss", nonmember_loss)).tolist()}}
    if member_reference is not None and nonmember_reference is not None:
        attacks["loss_ratio"] = {
            "members": histogram("loss_ratio", statistic(
                "loss_ratio", member_loss, member_reference)).tolist(),
            "nonmembers": histogram("loss_ratio", statistic(
                "loss_ratio", nonmember_loss, nonmember_reference)).tolist()}
    out: dict[str, Any] = {"format": FORMAT, "attacks": attacks}
    if "loss_ratio" in attacks and reference_round is not None:
        out["reference_round"] = int(reference_round)
    return out


def _counts(value: Any, bins: int, what: str) -> np.ndarray:
    try:
        raw = np.asarray(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be {bins} counts") from None
    if raw.shape != (bins,) or (raw.size and raw.dtype.kind not in "iu"):
        raise ValueError(f"{what} must be {bins} integer counts, got shape {raw.shape}")
    a = raw.astype(np.int64)
    if np.any(a < 0):
        raise ValueError(f"{what} holds a negative count")
    return a


def validate_histograms(data: Any, max_members: int | None = None,
                        max_nonmembers: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """A hospital's histograms checked and as arrays ({attack: {members, nonmembers}}):
    format, known attacks, shapes, non-negative integer counts, every attack over the same
    images, and no more images than the hospital declared (its training split for members,
    validation plus test for non-members). ValueError naming the first problem."""
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise ValueError(f"membership histograms must be a map of format {FORMAT!r}")
    attacks = data.get("attacks")
    if not isinstance(attacks, Mapping) or "loss" not in attacks:
        raise ValueError("membership histograms need the 'loss' attack")
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown:
        raise ValueError(f"unknown attacks {unknown}")
    out: dict[str, dict[str, np.ndarray]] = {}
    for attack, pair in attacks.items():
        if not isinstance(pair, Mapping):
            raise ValueError(f"{attack}: must map members and nonmembers to counts")
        bins = ATTACKS[attack][2]
        out[attack] = {side: _counts(pair.get(side), bins, f"{attack}.{side}")
                       for side in ("members", "nonmembers")}
    totals = {side: {int(out[a][side].sum()) for a in out} for side in ("members", "nonmembers")}
    if any(len(t) != 1 for t in totals.values()):
        raise ValueError("the attacks' histograms do not count the same images")
    for side, limit in (("members", max_members), ("nonmembers", max_nonmembers)):
        n = next(iter(totals[side]))
        if limit is not None and n > limit:
            raise ValueError(f"{n} {side} scored, {limit} declared")
    return out


def add_histograms(pooled: dict[str, dict[str, np.ndarray]] | None,
                   part: Mapping[str, Mapping[str, np.ndarray]]
                   ) -> dict[str, dict[str, np.ndarray]]:
    """Validated histograms added bin by bin; an attack only some hospitals sent is pooled
    over those (its member and non-member counts say how many images it covers)."""
    out = {a: dict(v) for a, v in (pooled or {}).items()}
    for attack, pair in part.items():
        if attack in out:
            out[attack] = {s: out[attack][s] + pair[s] for s in ("members", "nonmembers")}
        else:
            out[attack] = {s: np.asarray(pair[s], np.int64).copy()
                           for s in ("members", "nonmembers")}
    return out


# --------------------------------------------------------------------------- the ROC


def auc_from_histograms(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(member's statistic < non-member's), ties (one bin) counted half; NaN if a side is
    empty. Works on a (..., bins) stack of histograms too (the bootstrap)."""
    m = np.asarray(members, np.float64)
    n = np.asarray(nonmembers, np.float64)
    above = n.sum(axis=-1, keepdims=True) - np.cumsum(n, axis=-1)  # non-members in higher bins
    total = m.sum(axis=-1) * n.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (m * (above + 0.5 * n)).sum(axis=-1) / total  # type: ignore[no-any-return]


def auc_binning_bound(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """The most the histogram AUC can differ from the per-image AUC: half the share of
    member/non-member pairs that fall in the same bin."""
    m = np.asarray(members, np.float64)
    n = np.asarray(nonmembers, np.float64)
    return float(0.5 * (m * n).sum() / (m.sum() * n.sum()))


def auc_from_scores(member_stats: np.ndarray, nonmember_stats: np.ndarray) -> float:
    """The per-image AUC (Mann-Whitney, ties half): what the histograms approximate."""
    a = np.asarray(member_stats, np.float64).reshape(-1)
    b = np.sort(np.asarray(nonmember_stats, np.float64).reshape(-1))
    if not len(a) or not len(b):
        return float("nan")
    greater = len(b) - np.searchsorted(b, a, side="right")
    ties = np.searchsorted(b, a, side="right") - np.searchsorted(b, a, side="left")
    return float((greater + 0.5 * ties).sum() / (len(a) * len(b)))


def roc_points(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of "member when the statistic is at most edge k", for k = each bin's
    upper edge, with the empty rule (0, 0) first; (..., bins + 1) for a stack."""
    m = np.asarray(members, np.float64)
    n = np.asarray(nonmembers, np.float64)
    zero = np.zeros((*m.shape[:-1], 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.concatenate([zero, np.cumsum(m, axis=-1)], axis=-1) / m.sum(-1, keepdims=True)
        fpr = np.concatenate([zero, np.cumsum(n, axis=-1)], axis=-1) / n.sum(-1, keepdims=True)
    return fpr, tpr


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> np.ndarray:
    """The highest TPR of an edge threshold whose FPR is at most ``fpr``. With fewer than
    1/fpr non-members that is the TPR at zero false positives."""
    f, t = roc_points(members, nonmembers)
    return np.where(f <= fpr + 1e-12, t, 0.0).max(axis=-1)  # type: ignore[no-any-return]


def advantage(members: np.ndarray, nonmembers: np.ndarray) -> np.ndarray:
    """Membership advantage max(TPR - FPR) over edge thresholds (Yeom et al. 2018)."""
    f, t = roc_points(members, nonmembers)
    return (t - f).max(axis=-1)  # type: ignore[no-any-return]


def _interval(samples: np.ndarray, level: float) -> list[float]:
    lo, hi = np.nanpercentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def attack_numbers(members: np.ndarray, nonmembers: np.ndarray, n_boot: int = 1000,
                   seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """One attack's numbers from its pooled histograms, with bootstrap intervals."""
    m = np.asarray(members, np.int64)
    n = np.asarray(nonmembers, np.int64)
    out: dict[str, Any] = {"members": int(m.sum()), "nonmembers": int(n.sum())}
    if not m.sum() or not n.sum():
        return {**out, "auc": None}
    rng = np.random.default_rng(seed)
    mb = rng.multinomial(int(m.sum()), m / m.sum(), size=n_boot)
    nb = rng.multinomial(int(n.sum()), n / n.sum(), size=n_boot)
    auc = float(auc_from_histograms(m, n))
    out.update({"auc": auc, "auc_interval": _interval(auc_from_histograms(mb, nb), level),
                "auc_binning_bound": auc_binning_bound(m, n),
                "advantage": float(advantage(m, n))})
    for key, rate in FPRS.items():
        out[f"tpr_at_{key}_fpr"] = float(tpr_at_fpr(m, n, rate))
        out[f"tpr_at_{key}_fpr_interval"] = _interval(tpr_at_fpr(mb, nb, rate), level)
        # Below 1/rate non-members no threshold can have a false-positive rate of `rate`
        # without having none: the number is then the TPR at zero false positives.
        out[f"tpr_at_{key}_fpr_resolved"] = bool(n.sum() * rate >= 1)
    return out


def attack_report(pooled: Mapping[str, Mapping[str, np.ndarray]], hospitals: int = 0,
                  n_boot: int = 1000, seed: int = 0, level: float = 0.95
                  ) -> dict[str, Any] | None:
    """The audit of one version from pooled histograms: every attack's numbers, and at top
    level the strongest attack's (highest AUC), its name, and the reading for people.
    None when no attack has both members and non-members."""
    attacks = {a: attack_numbers(p["members"], p["nonmembers"], n_boot, seed, level)
               for a, p in sorted(pooled.items())}
    usable = {a: v for a, v in attacks.items() if v.get("auc") is not None}
    if not usable:
        return None
    attack = max(usable, key=lambda a: (usable[a]["auc"], a == "loss"))
    top = usable[attack]
    return {"format": FORMAT, "attack": attack, "attack_text": ATTACK_TEXT[attack],
            **{k: v for k, v in top.items()}, "hospitals": int(hospitals), "level": level,
            "n_boot": n_boot, "attacks": attacks, "reading": reading(top["auc"])}


def reading(auc: float | None) -> str:
    """The audit in one sentence for people."""
    if auc is None or not math.isfinite(auc):
        return "membership inference: not measured"
    return (f"an attacker who guesses membership from this model's outputs is right "
            f"{100 * auc:.0f}% of the time where a coin is right 50% (shown one training "
            "image and one unseen image, it picks the training one with probability "
            f"{auc:.3f}, the audit's AUC)")


def report_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The audit as round metrics (MLflow, version tags): ``membership_*``."""
    out: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool) \
                and math.isfinite(value):
            out[key] = float(value)

    put("membership_auc", report.get("auc"))
    low, high = report.get("auc_interval") or (None, None)
    put("membership_auc_low", low)
    put("membership_auc_high", high)
    put("membership_advantage", report.get("advantage"))
    put("membership_members", report.get("members"))
    put("membership_nonmembers", report.get("nonmembers"))
    for key in FPRS:
        put(f"membership_tpr_at_{key}_fpr", report.get(f"tpr_at_{key}_fpr"))
    for attack, numbers in (report.get("attacks") or {}).items():
        put(f"membership_{attack}_auc", numbers.get("auc"))
        put(f"membership_{attack}_tpr_at_1pct_fpr", numbers.get("tpr_at_1pct_fpr"))
    return out
