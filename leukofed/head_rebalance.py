"""Rebalance the global model's classifier head from the hospitals' feature statistics.

Under label skew every hospital's last layer learns its own class mix, and averaging those
heads leaves the global one biased against classes few hospitals hold (Benign, at 10
hospitals: recall 0.20 where centralized training reaches 0.85). The features underneath
are less skewed than the head. So, after a round (CCVR, Luo et al. 2021):

1. each hospital sends, per class, the count, the sum and the sum of outer products of its
   training images' penultimate features (``class_feature_stats``): aggregate numbers only,
   additive, so they pool exactly and can go through secure aggregation;
2. the aggregator pools them into one Gaussian per class (``pool_feature_stats``);
3. it refits the softmax head on the same number of virtual features drawn from every
   class (``refit_head``): the class-balanced head that centralized training aims at.

Pure NumPy, no I/O: the transport (Celery, the in-process benchmark) is the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HEAD_LAYER = "probabilities"  # leukofed.models: the softmax Dense layer
HEAD_WEIGHTS = (f"{HEAD_LAYER}/kernel", f"{HEAD_LAYER}/bias")  # their wire names


@dataclass(frozen=True)
class FeatureStats:
    """Per-class sufficient statistics of features: ``count`` (C,), ``total`` (C, D) and
    ``outer`` (C, D, D), sums over a hospital's images."""

    count: np.ndarray
    total: np.ndarray
    outer: np.ndarray

    def __add__(self, other: FeatureStats) -> FeatureStats:
        return FeatureStats(self.count + other.count, self.total + other.total,
                            self.outer + other.outer)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"count": self.count, "total": self.total, "outer": self.outer}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], num_classes: int,
                    dim: int) -> FeatureStats:
        """Checked against the model's shapes: these arrive from hospitals."""
        out = cls(*(np.asarray(arrays[k], np.float64) for k in ("count", "total", "outer")))
        want = {"count": (num_classes,), "total": (num_classes, dim),
                "outer": (num_classes, dim, dim)}
        for name, shape in want.items():
            got = getattr(out, name).shape
            if got != shape:
                raise ValueError(f"feature statistics {name!r}: shape {got}, want {shape}")
            if not np.isfinite(getattr(out, name)).all():
                raise ValueError(f"feature statistics {name!r}: not finite")
        if (out.count < 0).any():
            raise ValueError("feature statistics: negative count")
        return out


def class_feature_stats(features: np.ndarray, labels: np.ndarray, num_classes: int,
                        min_rows: int = 0) -> FeatureStats:
    """A hospital's per-class count, sum and sum of outer products (float64). A class with
    fewer than ``min_rows`` rows is sent as zeros: the mean of two or three images' features
    says too much about those images."""
    f = np.asarray(features, np.float64)
    count = np.zeros(num_classes)
    total = np.zeros((num_classes, f.shape[1]))
    outer = np.zeros((num_classes, f.shape[1], f.shape[1]))
    for c in range(num_classes):
        fc = f[labels == c]
        if len(fc) < max(min_rows, 1):
            continue
        count[c], total[c], outer[c] = len(fc), fc.sum(axis=0), fc.T @ fc
    return FeatureStats(count, total, outer)


def pool_feature_stats(stats: list[FeatureStats], min_count: int = 2
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(means (C, D), covariances (C, D, D), counts (C,)) of the pooled features; a class
    seen fewer than ``min_count`` times gets a zero mean and covariance (no Gaussian), and
    ``refit_head`` leaves it out."""
    pooled = stats[0]
    for s in stats[1:]:
        pooled = pooled + s
    n = pooled.count
    safe = np.maximum(n, 1.0)[:, None]
    means = pooled.total / safe
    covs = pooled.outer / safe[:, :, None] - np.einsum("ci,cj->cij", means, means)
    covs *= (n / np.maximum(n - 1.0, 1.0))[:, None, None]  # unbiased
    absent = n < min_count
    means[absent], covs[absent] = 0.0, 0.0
    return means, covs, n


def refit_head(weight: np.ndarray, bias: np.ndarray, means: np.ndarray, covs: np.ndarray,
               counts: np.ndarray, *, samples_per_class: int = 1000, l2: float = 1e-3,
               shrinkage: float = 0.05, min_count: int = 2, seed: int = 0,
               max_iterations: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The softmax head (``weight`` (D, C), ``bias`` (C,)) refitted on ``samples_per_class``
    virtual features per class drawn from the pooled Gaussians: the class-balanced
    cross-entropy plus ``l2`` times the squared weights, a convex problem that L-BFGS solves
    without a learning rate to tune. ``shrinkage`` pulls each covariance towards its
    diagonal (a few dozen images, 128 dimensions). A class with fewer than ``min_count``
    pooled images keeps its current column (nothing to draw it from)."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(seed)
    present = np.flatnonzero(counts >= min_count)
    if len(present) < 2:
        return weight.copy(), bias.copy()
    xs, ys = [], []
    for c in present:
        cov = (1 - shrinkage) * covs[c] + shrinkage * np.diag(np.diag(covs[c]))
        # eigh, not Cholesky: an estimated covariance has tiny negative eigenvalues
        vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
        root = vecs * np.sqrt(np.clip(vals, 0.0, None))
        xs.append(means[c] + rng.standard_normal((samples_per_class, len(vals))) @ root.T)
        ys.append(np.full(samples_per_class, np.searchsorted(present, c)))
    x, y = np.concatenate(xs), np.concatenate(ys)
    # Standardised features make the problem well conditioned; mapped back at the end.
    # The floor keeps a near-constant feature from earning a weight that its real, not
    # virtual, images would turn into large logits.
    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd = np.maximum(sd, 0.1 * sd.mean() + 1e-8)
    z = (x - mu) / sd
    d, k = z.shape[1], len(present)
    onehot = np.eye(k)[y]

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: d * k].reshape(d, k), theta[d * k :]
        logits = z @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        grad = (np.exp(logp) - onehot) / len(z)
        value = -(onehot * logp).sum() / len(z) + l2 * (w * w).sum()
        return value, np.concatenate([(z.T @ grad + 2 * l2 * w).ravel(), grad.sum(axis=0)])

    w0 = weight[:, present] * sd[:, None]
    b0 = bias[present] + mu @ weight[:, present]
    fit = minimize(loss, np.concatenate([w0.ravel(), b0]), jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iterations})
    wz, bz = fit.x[: d * k].reshape(d, k), fit.x[d * k :]
    new_w, new_b = weight.astype(np.float64).copy(), bias.astype(np.float64).copy()
    new_w[:, present] = wz / sd[:, None]
    new_b[present] = bz - (mu / sd) @ wz
    return new_w.astype(weight.dtype), new_b.astype(bias.dtype)


def rebalanced_head(weights: dict[str, np.ndarray], stats: list[FeatureStats], seed: int = 0
                    ) -> dict[str, np.ndarray]:
    """The head tensors of ``weights`` (by wire name, ``HEAD_WEIGHTS``) refitted on the
    hospitals' pooled statistics."""
    kernel, bias = (weights[n] for n in HEAD_WEIGHTS)
    new = refit_head(kernel, bias, *pool_feature_stats(stats), seed=seed)
    return dict(zip(HEAD_WEIGHTS, new, strict=True))
