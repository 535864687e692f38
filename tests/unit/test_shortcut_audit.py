"""Recolouring keeps structure; the audit catches a colour reader and passes a cell reader."""

from __future__ import annotations

import numpy as np
import pytest

from leukofed.audit import (
    audit_set_from_train,
    audit_verdict,
    colour_histograms,
    format_audit,
    other_classes,
    run_audit,
    stain_sums,
    targets_from_sums,
)
from leukofed.stain import (
    background_only,
    cell_mask,
    class_stain_targets,
    reinhard,
    spatial_recolour,
    stain_stats,
)

# Each class has its own stain (as in the real dataset) AND its own cell count (the
# "biology"): a colour reader and a cell reader both score well on original images.
STAINS = [((235, 225, 240), (120, 40, 170)), ((215, 230, 245), (90, 50, 190)),
          ((240, 240, 225), (160, 60, 150)), ((225, 215, 230), (110, 30, 200))]
SIZE = 48


def smear(label: int, seed: int, stain: int | None = None) -> np.ndarray:
    """A light field with (label + 1) purple cells in random places."""
    rng = np.random.default_rng(seed)
    background, cell = (np.array(c, float) for c in STAINS[label if stain is None else stain])
    img = np.broadcast_to(background, (SIZE, SIZE, 3)) + rng.normal(0, 4, (SIZE, SIZE, 3))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    slots = [(cy, cx) for cy in (8, 24, 40) for cx in (8, 24, 40)]  # never touching
    for k in rng.choice(len(slots), label + 1, replace=False):
        cy, cx = slots[k]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 16
        img[disc] = cell + rng.normal(0, 4, (int(disc.sum()), 3))
    return img.clip(0, 255).astype(np.uint8)


def dataset(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(4), n_per_class)
    images = np.stack([smear(int(y), seed * 1000 + i) for i, y in enumerate(labels)])
    return images, labels


def one_hot(pred: np.ndarray) -> np.ndarray:
    return np.eye(4)[pred]


def colour_reader(train_x: np.ndarray, train_y: np.ndarray):
    """A tiny model trained on mean colour: nearest class mean of the image's mean RGB."""
    means = np.stack([train_x[train_y == c].reshape(-1, 3).mean(0) for c in range(4)])

    def predict(x: np.ndarray) -> np.ndarray:
        m = x.reshape(len(x), -1, 3).mean(1)
        return one_hot(np.argmin(((m[:, None] - means[None]) ** 2).sum(-1), axis=1))
    return predict


def cell_reader(x: np.ndarray) -> np.ndarray:
    """A model that cannot see colour: on the grayscale image it counts the dark blobs."""
    from scipy.ndimage import label

    gray = x.astype(float).mean(-1)
    counts = [label(g < (np.median(g) + g.min()) / 2)[1] for g in gray]
    return one_hot(np.clip(np.array(counts) - 1, 0, 3))


def test_recolouring_is_deterministic_and_keeps_structure() -> None:
    img = smear(2, 1)
    target = stain_stats(smear(0, 2))
    a, b = reinhard(img, target), reinhard(img, target)
    assert np.array_equal(a, b)
    assert a.shape == img.shape and a.dtype == np.uint8
    assert not np.array_equal(a, img)  # the colour moved ...
    gray_in, gray_out = img.mean(-1).ravel(), a.mean(-1).ravel()
    assert np.corrcoef(gray_in, gray_out)[0, 1] > 0.95  # ... the structure did not
    assert (cell_mask(a) == cell_mask(img)).mean() > 0.97
    # The image now wears the target stain.
    assert np.allclose(stain_stats(a)[0], target[0], atol=0.05)


def test_spatial_recolour_moves_cells_and_background_apart() -> None:
    img = smear(1, 3)
    cells_t, back_t = stain_stats(smear(3, 4)), stain_stats(smear(0, 5))
    out = spatial_recolour(img, cells_t, back_t)
    mask = cell_mask(img)
    assert np.array_equal(out, spatial_recolour(img, cells_t, back_t))
    assert np.corrcoef(img.mean(-1).ravel(), out.mean(-1).ravel())[0, 1] > 0.9
    # Background and cells moved by different amounts: one global affine cannot undo it.
    shift_cells = out[mask].mean(0) - img[mask].mean(0)
    shift_back = out[~mask].mean(0) - img[~mask].mean(0)
    assert np.abs(shift_cells - shift_back).max() > 5


def test_background_only_removes_the_cells() -> None:
    img = smear(3, 6)
    assert cell_mask(img).sum() > 100
    out = background_only(img)
    assert cell_mask(out).sum() == 0
    assert out.shape == img.shape


def test_other_classes_never_own_class_and_cycles() -> None:
    y = np.repeat(np.arange(4), 6)
    t = other_classes(y, 4)
    assert not (t == y).any()
    for c in range(4):
        assert set(t[y == c]) == set(range(4)) - {c}


def test_stain_sums_pool_to_the_centralized_targets() -> None:
    x, y = dataset(5, 1)
    half = len(x) // 2
    idx = np.random.default_rng(0).permutation(len(x))
    parts = [stain_sums(x[idx[:half]], y[idx[:half]], 4),
             stain_sums(x[idx[half:]], y[idx[half:]], 4)]
    pooled = targets_from_sums(parts, 4)
    assert pooled is not None
    assert np.allclose(pooled, class_stain_targets(x, y, 4))
    assert targets_from_sums([{"counts": [1], "sums": [[0]]}], 4) is None  # malformed


def test_histogram_features_are_normalised() -> None:
    h = colour_histograms(np.stack([smear(0, 1), smear(1, 2)]))
    assert h.shape == (2, 48)
    assert np.allclose(h.reshape(2, 3, 16).sum(-1), 1.0)


@pytest.fixture(scope="module")
def audit_set():
    train_x, train_y = dataset(12, 1)
    test_x, test_y = dataset(8, 2)
    return train_x, train_y, audit_set_from_train(train_x, train_y, test_x, test_y, 4)


def test_audit_catches_a_colour_reader(audit_set) -> None:
    train_x, train_y, audit = audit_set
    m = run_audit(colour_reader(train_x, train_y), audit)
    assert m["audit_original_accuracy"] > 0.9  # looks excellent on its own test split
    assert m["audit_histogram_accuracy"] > 0.9  # ... as does colour alone
    assert m["audit_follow_colour"] > 0.5  # but it follows the colour
    assert m["audit_recoloured_accuracy"] < 0.4
    ok, reason = audit_verdict(m, max_follow_colour=0.1)
    assert not ok and "follow the new colour" in reason


def test_audit_passes_a_model_that_cannot_see_colour(audit_set) -> None:
    _, _, audit = audit_set
    m = run_audit(cell_reader, audit)
    assert m["audit_original_accuracy"] > 0.9
    assert m["audit_recoloured_accuracy"] > 0.9
    assert m["audit_spatial_accuracy"] > 0.85
    assert m["audit_follow_colour"] < 0.05
    assert m["audit_background_only_accuracy"] <= 0.35  # no cells left: chance
    assert m["audit_worst_macro_f1"] == min(m["audit_original_macro_f1"],
                                            m["audit_recoloured_macro_f1"])
    assert audit_verdict(m, max_follow_colour=0.1)[0]
    assert "recoloured" in format_audit(m)


def test_given_original_probabilities_are_used_not_predicted_again(audit_set) -> None:
    _, _, audit = audit_set
    seen: list[int] = []

    def counting(images: np.ndarray) -> np.ndarray:
        seen.append(len(images))
        assert images is not audit.original
        return cell_reader(images)

    given = run_audit(counting, audit, original=cell_reader(audit.original))
    assert len(seen) == 3  # recoloured, spatial, background only
    assert given == run_audit(cell_reader, audit)
    with pytest.raises(ValueError, match="original probabilities"):
        run_audit(cell_reader, audit, original=cell_reader(audit.original)[:3])


def test_verdict_without_audit_refuses() -> None:
    ok, reason = audit_verdict({})
    assert not ok and "no shortcut audit" in reason
    assert not audit_verdict({"audit_follow_colour": float("nan")})[0]
