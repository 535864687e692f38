"""Training and prediction speed of the default model under float32 and mixed bfloat16.

Each precision runs in its own process (Keras' dtype policy is global), alternated three
times on the same machine; the medians' ratio is what to read (one pair of runs on this
shared machine measured 153 against 92 images/s one way and 92 against 183 the other). Writes
benchmarks/results/precision.json and prints a markdown row per precision.

    .venv/bin/python benchmarks/bench_precision.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import header, write_json

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("float32", "mixed_bfloat16")
REPEATS = 3


def measure(policy: str, image_size: int, batch: int, steps: int) -> dict[str, float]:
    """One precision in this process: an epoch of ``steps`` batches to trace, then one timed."""
    import keras

    if policy != "float32":
        keras.mixed_precision.set_global_policy(policy)
    from leukofed.models import build_model
    from leukofed.train import Trainer, make_dataset

    trainer = Trainer(build_model("compact_cnn", image_size, seed=0))
    trainer.reset(learning_rate=1e-3)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch * steps, image_size, image_size, 3), dtype=np.uint8)
    ds = make_dataset(x, rng.integers(0, 4, len(x)), batch, training=True)
    trainer.train_epoch(ds)
    start = time.perf_counter()
    trainer.train_epoch(ds)
    train = len(x) / (time.perf_counter() - start)
    trainer.predict(x[:batch])
    start = time.perf_counter()
    trainer.predict(x[:256])
    return {"train_images_per_s": train,
            "predict_images_per_s": 256 / (time.perf_counter() - start)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2], 128, 32, 30)))
        return
    doc = header()
    doc.update(model="compact_cnn", image_size=128, batch_size=32, repeats=REPEATS, rows=[])
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in POLICIES}
    for _ in range(REPEATS):  # alternated: load that drifts touches both precisions alike
        for policy in POLICIES:
            out = subprocess.run([sys.executable, __file__, "--one", policy], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()
            runs[policy].append(json.loads(out[-1]))
    for policy, measured in runs.items():
        doc["rows"].append({
            "policy": policy, "runs": measured,
            **{k: float(np.median([m[k] for m in measured])) for k in measured[0]}})
    base = doc["rows"][0]["train_images_per_s"]
    for row in doc["rows"]:
        row["train_ratio_to_float32"] = row["train_images_per_s"] / base
        spread = [round(m["train_images_per_s"]) for m in row["runs"]]
        print(f"| {row['policy']} | {row['train_images_per_s']:.0f} {spread} | "
              f"{row['train_ratio_to_float32']:.2f}x | {row['predict_images_per_s']:.0f} |")
    write_json(ROOT / "benchmarks/results/precision.json", doc)


if __name__ == "__main__":
    main()
