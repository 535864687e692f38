"""Synthetic class-per-folder image sets: each class its own colour and stripe period, so a
tiny model learns them in seconds. For tests and for trying the stack (``make compose-demo``)
without the real smears; never evidence about a model (colour alone separates them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from leukofed.labels import CLASSES

_COLOURS = ([200, 80, 80], [80, 200, 80], [80, 80, 200], [200, 200, 80])


def write_synthetic_image(path: Path, label: int, seed: int, size: int = 48) -> Path:
    """A small image whose colour and pattern depend on the label, so a model can learn it."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 20, (size, size, 3)) + np.array(_COLOURS[label])
    yy, _ = np.mgrid[:size, :size]
    img[(yy // (4 + 2 * label)) % 2 == 0] *= 0.7
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
    return path


def write_synthetic_dataset(root: Path, per_class: int = 20,
                            folders: tuple[str, ...] = tuple(CLASSES), suffix: str = ".png",
                            seed_offset: int = 0, size: int = 48) -> Path:
    """ROOT/<Class>/img-<Class>-NNN<suffix>, ``per_class`` images each; ``seed_offset`` gives
    another set of images with the same names (another hospital, a test split)."""
    for label, folder in enumerate(folders):
        for i in range(per_class):
            write_synthetic_image(root / folder / f"img-{folder.split()[-1]}-{i + 1:03d}{suffix}",
                                  label, seed=seed_offset + label * 1000 + i, size=size)
    return root
