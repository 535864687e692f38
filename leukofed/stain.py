"""Stain and acquisition transforms in numpy: recolouring for the shortcut audit.

Everything here keeps pixel structure: a recoloured image has the same cells in the same
places, only their colour moves. That is what lets the audit ask "does the model read the
cells or the colour?".

Colour transfer follows Reinhard et al. (2001): match the per-channel mean and standard
deviation in the decorrelated l-alpha-beta space. Training augmentation uses a different
transfer (optical density space, leukofed.train), so the audit does not test the model on
the exact transform it was trained on.
"""

from __future__ import annotations

import numpy as np

# RGB -> LMS -> log10 -> l-alpha-beta (Reinhard et al. 2001, Ruderman et al. 1998).
_RGB2LMS = np.array([[0.3811, 0.5783, 0.0402],
                     [0.1967, 0.7244, 0.0782],
                     [0.0241, 0.1288, 0.8444]])
_LMS2LAB = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array(
    [[1, 1, 1], [1, 1, -2], [1, -1, 0]])
_LMS2RGB = np.linalg.inv(_RGB2LMS)
_LAB2LMS = np.linalg.inv(_LMS2LAB)

# A pixel is part of a stained white cell when it is purple: red and blue well above green.
# Chosen by looking at the masks on every class (docs/architecture.md); red blood cells,
# background and the red scale-bar text stay out of it.
CELL_PURPLE_MARGIN = 30.0


def rgb_to_lab(images: np.ndarray) -> np.ndarray:
    """uint8 or float RGB 0-255 (..., 3) to l-alpha-beta float64."""
    rgb = np.asarray(images, np.float64).clip(1.0, 255.0)
    lms = np.log10(rgb @ _RGB2LMS.T)
    return lms @ _LMS2LAB.T


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """l-alpha-beta back to uint8 RGB."""
    lms = 10.0 ** (np.asarray(lab, np.float64) @ _LAB2LMS.T)
    return (lms @ _LMS2RGB.T).clip(0, 255).round().astype(np.uint8)


def stain_stats(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(2, 3): mean and standard deviation of each l-alpha-beta channel (over ``mask``)."""
    lab = rgb_to_lab(image).reshape(-1, 3)
    if mask is not None:
        lab = lab[np.asarray(mask).reshape(-1)]
    if len(lab) == 0:
        return np.array([[0.0, 0.0, 0.0], [1e-6, 1e-6, 1e-6]])
    return np.stack([lab.mean(0), lab.std(0) + 1e-6])


def class_stain_targets(images: np.ndarray, labels: np.ndarray, n_classes: int
                        ) -> np.ndarray:
    """(n_classes, 2, 3): each class's average stain (mean of its images' statistics).

    Computed from training images only, so the audit never looks at its test labels."""
    stats = np.stack([stain_stats(im) for im in images]) if len(images) else np.zeros((0, 2, 3))
    out = np.zeros((n_classes, 2, 3))
    for c in range(n_classes):
        members = stats[labels == c]
        out[c] = members.mean(0) if len(members) else stats.mean(0)
    return out


def reinhard(image: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Recolour ``image`` (H, W, 3 uint8) to the stain ``target`` (2, 3); structure untouched."""
    lab = rgb_to_lab(image)
    src = stain_stats(image)
    return lab_to_rgb((lab - src[0]) / src[1] * target[1] + target[0])


def cell_mask(image: np.ndarray, margin: float = CELL_PURPLE_MARGIN) -> np.ndarray:
    """Boolean (H, W): pixels of stained (purple) white cells."""
    x = np.asarray(image, np.float32)
    return (x[..., 0] + x[..., 2]) / 2 - x[..., 1] > margin


def spatial_recolour(image: np.ndarray, cells_target: np.ndarray,
                     background_target: np.ndarray) -> np.ndarray:
    """Cells recoloured to one stain, everything else to another.

    Two whole-image Reinhard transfers, composed through the cell mask: each region keeps
    its structure, but the regions moved differently, so one global mean/std normalisation
    per image cannot undo it (it tests more than stain normalisation gives)."""
    mask = cell_mask(image)
    out = reinhard(image, background_target)
    out[mask] = reinhard(image, cells_target)[mask]
    return out


def background_only(image: np.ndarray, grow: int = 2) -> np.ndarray:
    """The stained cells painted over with the image's median background colour.

    What is left is what a model could read without cells: background tint, red cells,
    illumination and the scale bar. A model that reads cells should do no better than
    chance on these images."""
    mask = cell_mask(image)
    if grow:
        from scipy.ndimage import binary_dilation

        mask = binary_dilation(mask, iterations=grow)
    out = np.array(image, np.uint8, copy=True)
    if mask.all():
        return out
    out[mask] = np.median(out[~mask], axis=0).astype(np.uint8)
    return out
