"""A federation-wide stain bank for the stain-transfer augmentation.

The default augmentation (``leukofed.train.augment_stain``) moves each image's optical
densities to the stain of another image *of the same batch*, so that colour stops telling
the classes apart. Pooled training draws that other image from every class and laboratory.
A hospital's batch holds only its own label mix under its own laboratory: a hospital
without healthy smears never moves a leukaemic image to a healthy smear's stain, so the
colour shortcut survives there, and averaging does not remove it. This module is the maths
for giving every hospital the pooled stains instead, without moving an image:

1. each hospital sends, per class, the count, sum and sum of outer products of its training
   images' stain statistics (``class_stain_moments``: per image and channel, the log of the
   mean and of the spread of the optical density, six numbers): aggregate numbers only,
   additive, pooled exactly (``leukofed.head_rebalance.FeatureStats``);
2. the aggregator pools them into one Gaussian per class (``pool_feature_stats``);
3. each hospital draws its bank of stain targets from those Gaussians, every class equally
   often (``draw_stain_bank``), and its augmentation transfers to those targets.

Pure NumPy, no I/O. Only the ablation harness uses it (``sbank=1`` in
benchmarks/bench_fed_ablation.py, which pools the moments in process): measured, it does
not pay (docs/federated-recipe.md point 13: 0.889 against the default's 0.884-0.889), so
neither the hospitals nor the aggregator send or pool stain moments.
"""

from __future__ import annotations

import numpy as np

from leukofed.head_rebalance import FeatureStats, class_feature_stats, pool_feature_stats

STAIN_DIM = 6  # log mean and log spread of the optical density, per RGB channel
BANK_SIZE = 512
MIN_IMAGES_PER_CLASS = 5  # a class with fewer images at a hospital is not sent: too revealing


def image_stain_stats(images: np.ndarray, chunk: int = 256) -> np.ndarray:
    """(N, 6): for each image, ``log`` of the per-channel mean and standard deviation (plus
    1e-3) of its optical density ``-log((x + 1) / 256)``, the statistics the augmentation's
    stain transfer moves an image to."""
    out = []
    for i in range(0, len(images), chunk):
        od = -np.log((np.asarray(images[i:i + chunk], np.float32) + 1.0) / 256.0)
        mean = od.mean(axis=(1, 2))
        std = od.std(axis=(1, 2)) + 1e-3
        out.append(np.log(np.concatenate([mean, std], axis=1)))
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, STAIN_DIM))


def class_stain_moments(images: np.ndarray, labels: np.ndarray, num_classes: int,
                        min_images: int = MIN_IMAGES_PER_CLASS) -> FeatureStats:
    """A hospital's per-class sufficient statistics of its images' stain statistics."""
    return class_feature_stats(image_stain_stats(images), np.asarray(labels), num_classes,
                               min_rows=min_images)


def draw_stain_bank(moments: list[FeatureStats], size: int = BANK_SIZE, seed: int = 0,
                    shrinkage: float = 0.1) -> np.ndarray | None:
    """(size, 2, 3) stain targets (mean and spread of the optical density, per channel),
    drawn class-balanced from the pooled per-class Gaussians of ``moments``; None when fewer
    than two classes have a Gaussian (then the augmentation transfers within the batch)."""
    means, covs, counts = pool_feature_stats(moments, min_count=2)
    present = np.flatnonzero(counts >= 2)
    if len(present) < 2:
        return None
    rng = np.random.default_rng(seed)
    classes = rng.choice(present, size)
    draws = np.empty((size, STAIN_DIM))
    for c in present:
        rows = classes == c
        cov = (1 - shrinkage) * covs[c] + shrinkage * np.diag(np.diag(covs[c]))
        vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
        root = vecs * np.sqrt(np.clip(vals, 0.0, None))
        draws[rows] = means[c] + rng.standard_normal((int(rows.sum()), STAIN_DIM)) @ root.T
    return np.exp(draws).reshape(size, 2, 3).astype(np.float32)
