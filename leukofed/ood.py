""""Refer to a hematologist" instead of a confident answer on an image unlike the training data.

A classifier's softmax is confident far outside what it knows (measured: smears from another
laboratory called "Benign" with 0.85-0.99 confidence). So every model version carries an
*acquisition profile* of its training images, and every prediction is scored against it.

The profile is built from a handful of image statistics that say how a smear was acquired
and magnified: colour and saturation, brightness and contrast, how much of the field is
stained white cell, how large and how many those cells are, and sharpness. It is stored as
sufficient statistics (count, sum, sum of outer products, minimum, maximum), so hospitals
compute theirs locally and the aggregator pools them exactly, without moving an image.

An image is referred when a statistic falls outside the training range (widened by a
margin), when its Mahalanobis distance to the training images is beyond the bound, or when
its size rulers together say another magnification (the scale shift below). Every reason is
said in words, so a clinician sees *why*.

The bounds were chosen on the validation splits of six block splits (docs/shortcuts.md):
one distance bound alone could not keep in-distribution referrals under 5% on every split
and still catch half-magnification fields, whose statistics sit inside the training cloud
in every single direction but one. That direction is known from optics, so it is tested on
its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from leukofed.stain import cell_mask

PROFILE_FORMAT = "leukofed-acquisition-profile/3"
DESCRIPTORS: tuple[tuple[str, str], ...] = (
    ("red", "mean red"),
    ("green", "mean green"),
    ("blue", "mean blue"),
    ("saturation", "mean colour saturation"),
    ("contrast", "contrast"),
    ("cell_fraction", "share of the field that is stained white cell"),
    ("cell_size", "size of the stained cells (magnification)"),
    ("cell_count", "number of stained cells"),
    ("cell_chroma", "purple of the stained cells"),
    ("sharpness", "sharpness"),
    ("texture_scale", "texture scale of the field (magnification)"),
    ("fine_detail", "fine detail against cell-sized structure (magnification)"),
    ("cell_radius", "radius of the largest stained cell (magnification)"),
    ("red_cell_radius", "radius of the red cells (magnification)"),
)
DEFAULT_RANGE_MARGIN = 0.1  # widen each statistic's training range by this share of it
DEFAULT_MAX_DISTANCE = 6.0  # Mahalanobis distance
DEFAULT_MAX_SCALE_SHIFT = 2.75  # standard deviations along the magnification direction
# How each statistic moves when the magnification halves (cells smaller and more numerous,
# texture finer): the direction the scale shift is measured along. Twice the magnification
# moves the other way.
LOWER_MAGNIFICATION_SIGNS: dict[str, int] = {
    "cell_size": -1, "cell_count": 1, "sharpness": 1, "texture_scale": 1, "fine_detail": 1,
    "cell_radius": -1, "red_cell_radius": -1,
}


def _gray(x: np.ndarray) -> np.ndarray:
    return x @ np.array([0.299, 0.587, 0.114], np.float32)


def acquisition_descriptor(image: np.ndarray) -> np.ndarray:
    """(D,) statistics of one uint8 RGB image at the model's input size."""
    from scipy.ndimage import binary_fill_holes, distance_transform_edt, label

    x = np.asarray(image, np.float32)
    rgb = x.reshape(-1, 3) / 255.0
    mx, mn = rgb.max(1), rgb.min(1)
    saturation = float(np.mean((mx - mn) / (mx + 1e-3)))
    gray = _gray(x) / 255.0
    mask = cell_mask(image)
    area = mask.size
    labels, count = label(mask)
    if count:
        sizes = np.bincount(labels.ravel())[1:]
        sizes = sizes[sizes >= 4]  # specks are not cells
        count = len(sizes)
    cell_size = float(np.log(np.median(sizes) / area)) if count else math.log(1.0 / area)
    chroma = float(np.mean((x[..., 0][mask] + x[..., 2][mask]) / 2 - x[..., 1][mask]) / 255.0
                   ) if mask.any() else 0.0
    lap = (4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2]
           - gray[1:-1, 2:])
    # Spectral centroid of the field: red cells, whatever the class, set a size ruler, so
    # twice the magnification halves it and half the magnification doubles it.
    centred = gray - gray.mean()
    power = np.abs(np.fft.rfft2(centred)) ** 2
    power[0, 0] = 0.0
    radius = np.hypot(np.fft.fftfreq(gray.shape[0])[:, None], np.fft.rfftfreq(gray.shape[1]))
    texture_scale = math.log(float((power * radius).sum() / (power.sum() + 1e-12)) + 1e-6)
    # Power above 0.08 cycles/px against the band where red cells sit (0.02-0.08): half the
    # magnification moves red cells into the high band, twice moves them out of it.
    cell_band = float(power[(radius > 0.02) & (radius <= 0.08)].sum())
    fine_detail = math.log(float(power[radius > 0.08].sum()) / (cell_band + 1e-9) + 1e-9)
    # Two rulers that are not texture: the radius of the largest inscribed circle of the
    # largest stained cell, and the typical half-width of red cells (dark but not purple).
    # Half the magnification halves both (the spectral pair alone let 7% of 0.5x through).
    cell_radius = float(np.log(distance_transform_edt(binary_fill_holes(mask)).max() + 1.0))
    dark = gray < (np.percentile(gray, 95) + np.percentile(gray, 10)) / 2
    red_cells = dark & ~mask
    red_cell_radius = float(np.log(np.percentile(distance_transform_edt(red_cells)[red_cells], 90)
                                   + 1.0)) if red_cells.any() else 0.0
    return np.array([
        rgb[:, 0].mean(), rgb[:, 1].mean(), rgb[:, 2].mean(), saturation, gray.std(),
        mask.mean(), cell_size, math.log1p(count), chroma,
        math.log(float(np.abs(lap).mean()) + 1e-4), texture_scale, fine_detail,
        cell_radius, red_cell_radius,
    ], np.float64)


def descriptors(images: np.ndarray) -> np.ndarray:
    """(N, D) for a batch of uint8 images."""
    if len(images) == 0:
        return np.zeros((0, len(DESCRIPTORS)))
    return np.stack([acquisition_descriptor(im) for im in images])


@dataclass
class ProfileStats:
    """Sufficient statistics of the descriptors: poolable exactly across hospitals."""

    count: int = 0
    total: np.ndarray = field(default_factory=lambda: np.zeros(len(DESCRIPTORS)))
    outer: np.ndarray = field(
        default_factory=lambda: np.zeros((len(DESCRIPTORS), len(DESCRIPTORS))))
    low: np.ndarray = field(default_factory=lambda: np.full(len(DESCRIPTORS), np.inf))
    high: np.ndarray = field(default_factory=lambda: np.full(len(DESCRIPTORS), -np.inf))

    @classmethod
    def of_images(cls, images: np.ndarray) -> ProfileStats:
        d = descriptors(images)
        if len(d) == 0:
            return cls()
        return cls(len(d), d.sum(0), d.T @ d, d.min(0), d.max(0))

    def merge(self, other: ProfileStats) -> ProfileStats:
        return ProfileStats(self.count + other.count, self.total + other.total,
                            self.outer + other.outer, np.minimum(self.low, other.low),
                            np.maximum(self.high, other.high))

    def to_dict(self) -> dict[str, Any]:
        """Aggregate numbers only (what a hospital sends): no per-image value."""
        return {"format": PROFILE_FORMAT, "names": [n for n, _ in DESCRIPTORS],
                "count": int(self.count), "total": self.total.tolist(),
                "outer": self.outer.tolist(), "low": self.low.tolist(),
                "high": self.high.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProfileStats:
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not an acquisition profile: format {data.get('format')!r}")
        names = [n for n, _ in DESCRIPTORS]
        if list(data.get("names", [])) != names:
            raise ValueError(f"profile statistics {data.get('names')} are not {names}")
        d = len(names)
        total = np.asarray(data["total"], np.float64)
        outer = np.asarray(data["outer"], np.float64)
        low, high = np.asarray(data["low"], np.float64), np.asarray(data["high"], np.float64)
        if total.shape != (d,) or outer.shape != (d, d) or low.shape != (d,) \
                or high.shape != (d,) or int(data["count"]) < 0:
            raise ValueError("acquisition profile has the wrong shapes")
        if not (np.isfinite(total).all() and np.isfinite(outer).all()):
            raise ValueError("acquisition profile has non-finite sums")
        return cls(int(data["count"]), total, outer, low, high)


@dataclass(frozen=True)
class Verdict:
    in_distribution: bool
    distance: float
    reasons: tuple[str, ...]
    scale_shift: float = 0.0  # > 0: looks less magnified than training, < 0: more

    @property
    def refer(self) -> bool:
        return not self.in_distribution


@dataclass
class AcquisitionProfile:
    """What the training images looked like, and the rule that says "unlike them"."""

    mean: np.ndarray
    precision: np.ndarray
    low: np.ndarray
    high: np.ndarray
    count: int
    range_margin: float = DEFAULT_RANGE_MARGIN
    max_distance: float = DEFAULT_MAX_DISTANCE
    max_scale_shift: float = DEFAULT_MAX_SCALE_SHIFT

    @classmethod
    def from_stats(cls, stats: ProfileStats, range_margin: float = DEFAULT_RANGE_MARGIN,
                   max_distance: float = DEFAULT_MAX_DISTANCE,
                   max_scale_shift: float = DEFAULT_MAX_SCALE_SHIFT) -> AcquisitionProfile:
        if stats.count < 2:
            raise ValueError("an acquisition profile needs at least 2 images")
        mean = stats.total / stats.count
        cov = stats.outer / stats.count - np.outer(mean, mean)
        # Shrink towards the diagonal: a few hundred images, fourteen correlated statistics.
        # The floor (a standard deviation of 0.003, below the resolution of any statistic)
        # keeps a statistic that never varied in training from making the inverse explode.
        cov = 0.9 * cov + 0.1 * np.diag(np.diag(cov)) + 1e-5 * np.eye(len(mean))
        return cls(mean, np.linalg.pinv(cov), stats.low, stats.high, stats.count,
                   range_margin, max_distance, max_scale_shift)

    @cached_property
    def _scale_weights(self) -> np.ndarray:
        cov = np.linalg.pinv(self.precision)
        names = [n for n, _ in DESCRIPTORS]
        signs = np.array([LOWER_MAGNIFICATION_SIGNS.get(n, 0) for n in names], np.float64)
        weights = signs / np.sqrt(np.maximum(np.diag(cov), 1e-12))
        return weights / math.sqrt(max(float(weights @ cov @ weights), 1e-12))

    def scale_shift(self, descriptor: np.ndarray) -> float:
        """Standard deviations the image sits along the lower-magnification direction: each
        statistic in its own standard deviations, signed as magnification moves it, summed,
        and divided by the spread that sum has over the training images (correlations
        included), so in-distribution images score about N(0, 1)."""
        return float((descriptor - self.mean) @ self._scale_weights)

    def judge(self, descriptor: np.ndarray) -> Verdict:
        diff = descriptor - self.mean
        distance = float(np.sqrt(max(diff @ self.precision @ diff, 0.0)))
        width = (self.high - self.low) * self.range_margin
        reasons = []
        for i, (name, words) in enumerate(DESCRIPTORS):
            v = descriptor[i]
            if v < self.low[i] - width[i] or v > self.high[i] + width[i]:
                side = "below" if v < self.low[i] else "above"
                reasons.append(f"{words} ({name} {v:.3g}) is {side} the training range "
                               f"{self.low[i]:.3g} to {self.high[i]:.3g}")
        if distance > self.max_distance:
            reasons.append(f"the image's acquisition statistics are {distance:.1f} standard "
                           f"deviations from the training images' (bound {self.max_distance:g})")
        shift = self.scale_shift(descriptor)
        if abs(shift) > self.max_scale_shift:
            looks = "lower" if shift > 0 else "higher"
            reasons.append(f"the image looks taken at a {looks} magnification than the "
                           f"training images: its cell sizes and texture scale sit "
                           f"{abs(shift):.1f} standard deviations away together (bound "
                           f"{self.max_scale_shift:g})")
        return Verdict(not reasons, distance, tuple(reasons), shift)

    def judge_images(self, images: np.ndarray) -> list[Verdict]:
        return [self.judge(d) for d in descriptors(images)]

    def to_dict(self) -> dict[str, Any]:
        return {"format": PROFILE_FORMAT, "names": [n for n, _ in DESCRIPTORS],
                "count": self.count, "mean": self.mean.tolist(),
                "precision": self.precision.tolist(), "low": self.low.tolist(),
                "high": self.high.tolist(), "range_margin": self.range_margin,
                "max_distance": self.max_distance, "max_scale_shift": self.max_scale_shift}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AcquisitionProfile:
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not an acquisition profile: format {data.get('format')!r}")
        if list(data.get("names", [])) != [n for n, _ in DESCRIPTORS]:
            raise ValueError("acquisition profile was made with other statistics")
        d = len(DESCRIPTORS)
        arrays = {}
        for name, shape in (("mean", (d,)), ("precision", (d, d)), ("low", (d,)),
                            ("high", (d,))):
            value = np.asarray(data[name], np.float64)
            if value.shape != shape or not np.isfinite(value).all():
                raise ValueError(f"{name} is not finite numbers of shape {shape}")
            arrays[name] = value
        margin, bound = float(data["range_margin"]), float(data["max_distance"])
        # Profiles registered before the scale test carry no bound for it: they get the
        # default, so every served version refers a field at another magnification.
        scale = float(data.get("max_scale_shift", DEFAULT_MAX_SCALE_SHIFT))
        if not all(np.isfinite(v) and v > 0 for v in (bound, scale)) \
                or not (np.isfinite(margin) and margin >= 0):
            raise ValueError("max_distance, max_scale_shift or range_margin out of range")
        return cls(arrays["mean"], arrays["precision"], arrays["low"], arrays["high"],
                   int(data["count"]), margin, bound, scale)
