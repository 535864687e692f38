"""Probe: the membership audit (leukofed.membership) on real smear images, the default
compact CNN trained centrally on only 96 training images for up to 150 epochs (an extreme
that invites memorisation), 400 test-split images as non-members. Prints the audit at a few
epochs. About 2.5 minutes on 2 CPU cores. Numbers: docs/privacy.md.

    .venv/bin/python scripts/probe_membership.py [DATA_DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np


def main(data_dir: str) -> None:
    import tensorflow as tf

    from leukofed import membership as mi
    from leukofed.data import scan_dataset
    from leukofed.models import build_model
    from leukofed.splits import group_split
    from leukofed.train import Trainer, load_arrays

    start = time.time()
    split = group_split(scan_dataset(data_dir).records, 0.15, 0.15, 0)
    rng = np.random.default_rng(0)
    members = [split["train"][i] for i in rng.permutation(len(split["train"]))[:96]]
    held_out = [split["test"][i] for i in rng.permutation(len(split["test"]))[:400]]
    xm, ym = load_arrays(members, 64)
    xn, yn = load_arrays(held_out, 64)
    trainer = Trainer(build_model("compact_cnn", 64, seed=0), learning_rate=1e-3)
    data = tf.data.Dataset.from_tensor_slices((xm.astype(np.float32), ym)) \
        .shuffle(len(ym), seed=0).batch(16)
    reference = None
    for epoch in range(1, 151):
        trainer.train_epoch(data)
        if epoch not in (1, 10, 40, 150):
            continue
        pm, pn = trainer.predict(xm), trainer.predict(xn)
        lm, ln = mi.per_image_loss(pm, ym), mi.per_image_loss(pn, yn)
        if reference is None:  # epoch 1 is the calibrated attack's reference model
            reference = (lm, ln)
        hist = mi.hospital_histograms(lm, ln, *reference, reference_round=1)
        r = mi.attack_report(mi.validate_histograms(hist))
        assert r is not None
        print(f"epoch {epoch}: train acc {(pm.argmax(1) == ym).mean():.3f}, test acc "
              f"{(pn.argmax(1) == yn).mean():.3f}, mean loss members {lm.mean():.3f} / "
              f"non-members {ln.mean():.3f}; {r['attack']} AUC {r['auc']:.3f} "
              f"[{r['auc_interval'][0]:.3f}, {r['auc_interval'][1]:.3f}], TPR at 1% FPR "
              f"{r['tpr_at_1pct_fpr']:.3f}; " + ", ".join(
                  f"{a} {v['auc']:.3f}" for a, v in r["attacks"].items())
              + f" ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    main(sys.argv[1] if len(sys.argv) > 1 else str(root.parent / "shared" / "data" / "all-pbs"))
