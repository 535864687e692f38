"""Images a blood-smear classifier should refuse to answer: the "refer" decision's test set.

Made from in-distribution test images (or from photographs that ship inside installed
packages), so tests and benchmarks need no download: grayscale photographs of smears,
the same smears at twice and half the magnification, blank fields, and natural photographs.
Simulated laboratories outside the training range come from leukofed.labs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def grayscale(image: np.ndarray) -> np.ndarray:
    """A black-and-white photograph of the same smear."""
    gray = np.asarray(Image.fromarray(image).convert("L"))
    return np.repeat(gray[..., None], 3, axis=2)


def magnified(image: np.ndarray) -> np.ndarray:
    """Twice the magnification: the central half of the field, enlarged."""
    s = image.shape[0]
    q = s // 4
    return _resize(np.ascontiguousarray(image[q:q + s // 2, q:q + s // 2]), s)


def demagnified(images: list[np.ndarray]) -> np.ndarray:
    """Half the magnification: four fields side by side, shrunk to one."""
    s = images[0].shape[0]
    tiles = [_resize(im, s // 2) for im in (images * 4)[:4]]
    mosaic = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
    return _resize(mosaic, s)


def blank_field(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """A field with nothing on it: the slide's background colour, sensor noise, vignetting."""
    rng = np.random.default_rng(seed)
    s = image.shape[0]
    colour = np.percentile(image.reshape(-1, 3), 90, axis=0)
    yy, xx = np.mgrid[0:s, 0:s] / max(s - 1, 1) - 0.5
    vignette = 1.0 - 0.25 * (yy ** 2 + xx ** 2)
    field = colour[None, None, :] * vignette[..., None] + rng.normal(0, 2.0, (s, s, 3))
    return field.clip(0, 255).astype(np.uint8)


def _photo_files() -> list[Path]:
    """Photographs bundled with matplotlib and scikit-learn (no download)."""
    import matplotlib
    import sklearn

    files = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
             Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg",
             Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg"]
    return [f for f in files if f.is_file()]


def natural_photos(size: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` random square crops (20-100% of the short side) of natural photographs."""
    rng = np.random.default_rng(seed)
    photos = [np.asarray(Image.open(f).convert("RGB")) for f in _photo_files()]
    if not photos:
        raise FileNotFoundError("no bundled photographs found (matplotlib, scikit-learn)")
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.2, 1.0))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out.append(_resize(np.ascontiguousarray(photo[y:y + side, x:x + side]), size))
    return np.stack(out)


def probe_sets(images: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Every kind of out-of-distribution image, made from in-distribution ``images``."""
    n = len(images)
    return {
        "grayscale": np.stack([grayscale(im) for im in images]),
        "magnified_2x": np.stack([magnified(im) for im in images]),
        "magnified_0.5x": np.stack([demagnified([images[(i + k) % n] for k in range(4)])
                                    for i in range(n)]),
        "blank_field": np.stack([blank_field(im, seed + i) for i, im in enumerate(images)]),
        "natural_photo": natural_photos(images.shape[1], n, seed),
    }
