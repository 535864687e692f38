"""The BatchNorm momentum fix on real images: the previous team's 0.30 reproduced and fixed.

MobileNetV2 from scratch with Keras' default momentum (0.999) keeps near-initial moving
statistics after a few hundred steps, so inference-mode accuracy stays at the majority
rate. With momentum 0.9 it moves well above it within a few epochs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leukofed.data import scan_dataset
from leukofed.metrics import classification_metrics
from leukofed.models import build_model
from leukofed.splits import group_split
from leukofed.train import Trainer, fit, load_arrays

pytestmark = pytest.mark.realdata


# Six epochs, not four: four left run-to-run spread (0.45-0.64 validation accuracy on one
# machine and CI) too close to the bar; six gave 0.62-0.72 over three subsets.
EPOCHS = 6


def _val_accuracy(bn_momentum: float | None, train, val) -> float:
    # The previous team's setting (whole field, flips and a small jitter), where it failed.
    trainer = Trainer(build_model("mobilenetv2", 64, bn_momentum=bn_momentum, seed=0,
                                  cell_focus=False))
    # No BN recalibration here: it would hide the momentum effect this test is about.
    fit(trainer, train, None, epochs=EPOCHS, batch_size=32, learning_rate=2e-3, progress=False,
        recalibrate_bn=False, augmentation="basic")
    return classification_metrics(val[1], trainer.predict(val[0]))["accuracy"]


def test_bn_momentum_fix_lifts_validation_above_majority(real_data: Path, tmp_path) -> None:
    ds = scan_dataset(real_data, verify=False)
    split = group_split(ds.records, seed=0)
    rng = np.random.default_rng(0)
    train_recs = [split.train[i] for i in rng.choice(len(split.train), 640, replace=False)]
    train = load_arrays(train_recs, 64, tmp_path)
    val = load_arrays(split.val, 64, tmp_path)
    majority = np.bincount(val[1]).max() / len(val[1])

    fixed = _val_accuracy(0.9, train, val)
    keras_default = _val_accuracy(None, train, val)
    assert fixed > majority + 0.15, (fixed, majority)
    assert keras_default < majority + 0.1, (keras_default, majority)  # the trap is real
