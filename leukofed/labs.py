"""Simulated laboratories: each hospital's images as its own microscope and stain would give them.

In this dataset the classes differ by stain and acquisition as well as by cells, so a model
can score well by reading the slide. To test that it reads cells, every simulated hospital
gets its own *acquisition* (stain, illumination, optics, camera, JPEG), and one extra
laboratory never trains and is only tested (``unseen_lab``).

An :class:`Acquisition` is a deterministic, purely photometric transform of a uint8 RGB
image, in the order light meets it:

1. stain, in optical density ``OD = -log((I + 1) / 256)``: ``OD' = M @ OD + offset`` per
   pixel, with ``M`` a 3x3 matrix near the identity (its diagonal: how strongly each channel
   is absorbed, i.e. stain intensity; its off-diagonal: hue) and ``offset`` a background tint;
2. illumination: a brightness factor times a field with vignetting (light lost towards the
   corners) and a linear gradient across the field;
3. optics: a Gaussian blur (``blur_sigma`` pixels at 224 px, scaled with the image side);
4. camera: saturation at 255, a gamma, sensor noise (seeded from the transform and the
   image's own bytes: the same image always gets the same noise), rounding to uint8;
5. storage: JPEG recompression at ``jpeg_quality`` (0: none).

No step moves a pixel: the cells stay where they are, only their colour, sharpness and
brightness change. ``draw_acquisition(rng, "inside")`` draws from the range seen between
laboratories using the same Romanowsky-type stain; ``"outside"`` from beyond it (another hue,
much darker or lighter, heavy blur, strong JPEG): a "refer" decision should fire there.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "leukofed-acquisition/1"  # bump when apply() changes: it is part of the cache key
ACQUISITION_FILE = "acquisition.json"
UNSEEN_LAB_DIR = "unseen-lab"
REFERENCE_SIZE = 224  # blur_sigma is given in pixels of a 224 px image (the dataset's size)
KINDS = ("inside", "outside")

_LABELS = ("name", "kind")  # describe an acquisition, do not change its pixels
_IDENTITY = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


class AcquisitionError(ValueError):
    """An acquisition description that cannot be used (wrong format, field or value)."""


def _floats(value: Any, n: int, what: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise AcquisitionError(f"{what} must be {n} numbers, got {value!r}") from exc
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise AcquisitionError(f"{what} must be {n} finite numbers, got {value!r}")
    return out


@dataclass(frozen=True)
class Acquisition:
    """One laboratory's acquisition; the default is the identity (images unchanged)."""

    name: str = "reference"
    od_matrix: tuple[tuple[float, float, float], ...] = _IDENTITY
    od_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    brightness: float = 1.0  # light intensity factor
    vignette: float = 0.0  # fraction of light lost in the corners, 0 <= v < 1
    gradient: float = 0.0  # illumination difference from one side of the field to the other
    gradient_angle: float = 0.0  # direction of the gradient, degrees
    blur_sigma: float = 0.0  # Gaussian sigma in pixels at REFERENCE_SIZE
    gamma: float = 1.0  # camera response, I_out = 255 * (I / 255) ** gamma
    noise_std: float = 0.0  # sensor noise, intensity levels (0-255)
    jpeg_quality: int = 0  # 0: no JPEG recompression, else 1-100
    kind: str = ""  # how it was drawn ("inside", "outside"); informative, not a parameter

    def __post_init__(self) -> None:
        rows = self.od_matrix
        if not isinstance(rows, (list, tuple)) or len(rows) != 3:
            raise AcquisitionError(f"od_matrix must be 3 rows of 3 numbers, got {rows!r}")
        matrix = tuple(_floats(r, 3, "each od_matrix row") for r in rows)
        object.__setattr__(self, "od_matrix", matrix)
        object.__setattr__(self, "od_offset", _floats(self.od_offset, 3, "od_offset"))
        for name in ("brightness", "vignette", "gradient", "gradient_angle", "blur_sigma",
                     "gamma", "noise_std"):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value):
                raise AcquisitionError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        q = self.jpeg_quality
        if isinstance(q, bool) or not isinstance(q, int) or not 0 <= q <= 100:
            raise AcquisitionError(f"jpeg_quality must be an integer 0-100 (0: none), got {q!r}")
        checks = (
            (0.0 < self.brightness <= 10.0, "brightness must be in (0, 10]"),
            (0.0 <= self.vignette < 1.0, "vignette must be in [0, 1)"),
            (-1.0 < self.gradient < 1.0, "gradient must be in (-1, 1)"),
            (0.0 <= self.blur_sigma <= 20.0, "blur_sigma must be in [0, 20]"),
            (0.1 <= self.gamma <= 10.0, "gamma must be in [0.1, 10]"),
            (0.0 <= self.noise_std <= 64.0, "noise_std must be in [0, 64]"),
            (all(abs(v) <= 10.0 for r in matrix for v in r), "od_matrix entries must be <= 10"),
            (all(abs(v) <= 5.0 for v in self.od_offset), "od_offset entries must be <= 5"),
            (isinstance(self.name, str), "name must be a string"),
            (isinstance(self.kind, str), "kind must be a string"),
        )
        for ok, message in checks:
            if not ok:
                raise AcquisitionError(message)

    # ------------------------------------------------------------ (de)serialisation

    def params(self) -> dict[str, Any]:
        """The transform's parameters (no name or kind): equal parameters, equal pixels."""
        return {"od_matrix": [list(r) for r in self.od_matrix],
                "od_offset": list(self.od_offset),
                **{f.name: getattr(self, f.name) for f in fields(self)
                   if f.name not in _LABELS + ("od_matrix", "od_offset")}}

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "name": self.name, "kind": self.kind, **self.params()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Acquisition:
        """The inverse of ``to_dict``; missing parameters take their identity value, unknown
        keys or a wrong format are refused (a typo must not silently mean "no change")."""
        if not isinstance(data, Mapping):
            raise AcquisitionError(f"an acquisition is a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise AcquisitionError(f"not an acquisition: format {data.get('format')!r}, "
                                   f"expected {FORMAT!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"format"})
        if unknown:
            raise AcquisitionError(f"unknown acquisition fields {unknown}; known: {sorted(known)}")
        try:
            return cls(**{k: v for k, v in data.items() if k != "format"})
        except TypeError as exc:
            raise AcquisitionError(str(exc)) from exc

    def key(self) -> str:
        """Short digest of FORMAT and the parameters: names a cache entry and seeds the noise."""
        text = json.dumps({"format": FORMAT, **self.params()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def is_identity(self) -> bool:
        return self.params() == Acquisition().params()

    # ------------------------------------------------------------ the transform

    def illumination_field(self, height: int, width: int) -> np.ndarray:
        """(H, W) light factor: brightness x vignetting x linear gradient."""
        v = np.linspace(-1.0, 1.0, height)[:, None]
        u = np.linspace(-1.0, 1.0, width)[None, :]
        light = np.full((height, width), self.brightness)
        if self.vignette:
            light = light * (1.0 - self.vignette * (u * u + v * v) / 2.0)
        if self.gradient:
            a = math.radians(self.gradient_angle)
            light = light * (1.0 + self.gradient * (u * math.cos(a) + v * math.sin(a)) / 2.0)
        return light

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The image (H, W, 3 uint8) as this laboratory would have acquired it (uint8).

        Deterministic: the same image and parameters give the same bytes (the noise is
        seeded from both). Pixel positions never change."""
        x = np.asarray(image)
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 uint8 image, got {x.dtype} {x.shape}")
        if self.is_identity:
            return x.copy()
        h, w = x.shape[:2]
        od = -np.log((x.astype(np.float64) + 1.0) / 256.0)
        od = od @ np.asarray(self.od_matrix).T + np.asarray(self.od_offset)
        light = 256.0 * np.exp(-od) - 1.0
        light *= self.illumination_field(h, w)[..., None]
        sigma = self.blur_sigma * min(h, w) / REFERENCE_SIZE
        if sigma > 0.05:
            from scipy.ndimage import gaussian_filter

            light = gaussian_filter(light, sigma=(sigma, sigma, 0.0), mode="reflect")
        light = np.clip(light, 0.0, 255.0)
        if self.gamma != 1.0:
            light = 255.0 * (light / 255.0) ** self.gamma
        if self.noise_std > 0:
            digest = hashlib.sha256(self.key().encode() + str(x.shape).encode() + x.tobytes())
            rng = np.random.default_rng(int.from_bytes(digest.digest()[:8], "little"))
            light = light + rng.normal(0.0, self.noise_std, light.shape)
        out = np.clip(np.rint(light), 0, 255).astype(np.uint8)
        if self.jpeg_quality:
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(out).save(buf, format="JPEG", quality=self.jpeg_quality)
            buf.seek(0)
            out = np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8)
        return out


def apply_batch(images: np.ndarray, acquisition: Acquisition | None) -> np.ndarray:
    """A laboratory applied to already-decoded images (N, H, W, 3 uint8), e.g. a test split at
    model-input size; blur scales with the side, so this approximates applying it at 224 px
    and resizing (what ``load_arrays(..., acquisition=...)`` does)."""
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
        raise ValueError(f"expected N x H x W x 3 uint8 images, got {x.dtype} {x.shape}")
    if acquisition is None or acquisition.is_identity:
        return x.copy()
    out = np.empty_like(x)
    for i in range(len(x)):
        out[i] = acquisition.apply(x[i])
    return out


def load_acquired_image(source: bytes | str | Path, size: int,
                        acquisition: Acquisition | None) -> np.ndarray:
    """``preprocessing.load_image`` with the laboratory applied to the decoded image at its
    own resolution (where blur and JPEG are defined), before the resize to ``size``."""
    from PIL import Image

    from leukofed.preprocessing import decode_image, to_model_input

    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
    img = decode_image(data)
    if acquisition is not None and not acquisition.is_identity:
        img = Image.fromarray(acquisition.apply(np.asarray(img, dtype=np.uint8)))
    return to_model_input(img, size)


# ---------------------------------------------------------------- files


def load_acquisition(path: str | Path) -> Acquisition:
    """Read an acquisition.json; any problem is an AcquisitionError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise AcquisitionError(f"acquisition file not found: {path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AcquisitionError(f"acquisition file {path} is not readable JSON: {exc}") from exc
    try:
        return Acquisition.from_dict(data)
    except AcquisitionError as exc:
        raise AcquisitionError(f"acquisition file {path}: {exc}") from exc


def write_acquisition(path: str | Path, acquisition: Acquisition) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(acquisition.to_dict(), indent=1) + "\n")
    return path


# ---------------------------------------------------------------- drawing laboratories

# "inside": laboratories using the same Romanowsky-type (Wright-Giemsa-like) stain with
# their own protocol, slides and microscope. For scale: in this dataset the mean optical
# density of one class's images varies by 20-40 % between images, and between classes by up
# to 3x (that is the shortcut). Each entry: (low, high) of a uniform draw.
INSIDE = {
    "intensity": (0.8, 1.25),  # common factor on OD: staining time, smear thickness
    "channel": (0.92, 1.08),  # per-channel factor on OD: stain batch, pH
    "mix": (-0.05, 0.05),  # off-diagonal OD mixing (times intensity): small hue shifts
    "offset": (-0.02, 0.02),  # background tint (OD)
    "brightness": (0.9, 1.08),
    "vignette": (0.0, 0.2),
    "gradient": (0.0, 0.1),
    "blur_sigma": (0.0, 0.8),
    "gamma": (0.88, 1.12),
    "noise_std": (0.0, 2.0),
    "jpeg_quality": (75, 95),
}
# "outside": beyond every inside range (each parameter falls outside its inside interval):
# another stain hue, much darker or much lighter, dim light, heavy blur, strong compression.
OUTSIDE = {
    "intensity": ((0.45, 0.6), (1.7, 2.3)),  # washed out or over-stained
    "channel": ((0.7, 0.85), (1.2, 1.45)),  # per channel, low or high
    "mix": (0.15, 0.3),  # magnitude (times intensity), random sign: another hue
    "offset": (0.04, 0.1),  # magnitude, random sign
    "brightness": ((0.6, 0.78), (1.12, 1.2)),
    "vignette": (0.3, 0.5),
    "gradient": (0.2, 0.35),
    "blur_sigma": (1.6, 2.6),
    "gamma": ((0.65, 0.8), (1.3, 1.6)),
    "noise_std": (3.0, 6.0),
    "jpeg_quality": (25, 45),
}


def _either(rng: np.random.Generator, ranges: tuple[tuple[float, float], ...]) -> float:
    low, high = ranges[int(rng.integers(len(ranges)))]
    return float(rng.uniform(low, high))


def _signed(rng: np.random.Generator, magnitude: tuple[float, float]) -> float:
    return float(rng.choice([-1.0, 1.0]) * rng.uniform(*magnitude))


def draw_acquisition(rng: np.random.Generator, kind: str = "inside", name: str = "lab"
                     ) -> Acquisition:
    """One laboratory drawn from the realistic range ("inside") or beyond it ("outside")."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")

    def r(x: float) -> float:  # short, readable JSON; the rounded value is the lab
        return round(x, 4)

    if kind == "inside":
        p = INSIDE
        intensity = rng.uniform(*p["intensity"])
        diag = [intensity * rng.uniform(*p["channel"]) for _ in range(3)]
        mix = [[diag[i] if i == j else intensity * rng.uniform(*p["mix"]) for j in range(3)]
               for i in range(3)]
        offset = [rng.uniform(*p["offset"]) for _ in range(3)]
        values = {k: rng.uniform(*p[k]) for k in ("brightness", "vignette", "gradient",
                                                  "blur_sigma", "gamma", "noise_std")}
        quality = int(rng.integers(p["jpeg_quality"][0], p["jpeg_quality"][1] + 1))
    else:
        q = OUTSIDE
        intensity = _either(rng, q["intensity"])
        diag = [intensity * _either(rng, q["channel"]) for _ in range(3)]
        mix = [[diag[i] if i == j else intensity * _signed(rng, q["mix"]) for j in range(3)]
               for i in range(3)]
        offset = [_signed(rng, q["offset"]) for _ in range(3)]
        # A washed-out stain gets dim light and a darkening gamma, never more lightening on
        # top: the cells must stay visible (an outside lab is unusual, not blank).
        washed_out = intensity < 1.0
        values = {
            "brightness": _either(rng, q["brightness"][:1] if washed_out else q["brightness"]),
            "vignette": rng.uniform(*q["vignette"]),
            "gradient": rng.uniform(*q["gradient"]),
            "blur_sigma": rng.uniform(*q["blur_sigma"]),
            "gamma": _either(rng, q["gamma"][1:] if washed_out else q["gamma"]),
            "noise_std": rng.uniform(*q["noise_std"]),
        }
        quality = int(rng.integers(q["jpeg_quality"][0], q["jpeg_quality"][1] + 1))
    angle = rng.uniform(0.0, 360.0)
    return Acquisition(
        name=name,
        od_matrix=tuple(tuple(r(v) for v in row) for row in mix),  # type: ignore[arg-type]
        od_offset=tuple(r(v) for v in offset),  # type: ignore[arg-type]
        gradient_angle=r(angle), jpeg_quality=quality,
        kind=kind,
        **{k: r(float(v)) for k, v in values.items()},
    )


def draw_labs(n: int, seed: int, kind: str = "inside") -> dict[str, Acquisition]:
    """One laboratory per simulated hospital (ids as ``partition.hospital_ids``). Hospital
    i's laboratory depends only on (seed, i): adding hospitals leaves the others' alone."""
    from leukofed.partition import hospital_ids

    return {h: draw_acquisition(np.random.default_rng([seed, 1, i]), kind, name=f"lab-{h}")
            for i, h in enumerate(hospital_ids(n))}


def unseen_lab(seed: int, kind: str = "inside") -> Acquisition:
    """The test-only laboratory: no hospital trains on it. Drawn from its own random stream,
    so it never repeats a hospital's laboratory and does not depend on how many there are."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
    rng = np.random.default_rng([seed, 2, KINDS.index(kind)])
    return draw_acquisition(rng, kind, name=UNSEEN_LAB_DIR)
