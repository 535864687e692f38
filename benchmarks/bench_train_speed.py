"""Training speed of the default model, this working tree against an earlier commit.

Three numbers per side, each the median of alternated runs in their own processes (this
shared 2-core machine drifts; only a ratio measured side by side means anything):

- ``epoch_images_per_s``: a training epoch as the recipe runs it (the augmenting input
  pipeline and the train step sharing the two cores), and ``cpu_ms_per_image``, the
  process's CPU time for it: other tenants move the first much more than the second;
- ``step_ms``: one compiled train step on a batch already in memory (model, loss,
  gradients, optimizer);
- ``pipeline_ms``: one augmented batch from the input pipeline alone.

Random uint8 images at 128 px, 1,472 an epoch (the 3-hospital union's size), batch 32,
the default compact CNN and stain recipe. Writes benchmarks/results/train-speed.json and
prints a markdown table.

    .venv/bin/python benchmarks/bench_train_speed.py [--base REV] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import header, write_json

ROOT = Path(__file__).resolve().parents[1]
# The last commit before the fused BatchNorm and the cheaper augmentation.
DEFAULT_BASE = "3660e39"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(image_size: int = 128, batch: int = 32, steps: int = 46) -> dict[str, float]:
    """This process's tree (whatever ``leukofed`` imports): the three numbers, once."""
    import tensorflow as tf

    from leukofed.models import build_model
    from leukofed.train import Trainer, make_dataset

    trainer = Trainer(build_model("compact_cnn", image_size, seed=0))
    trainer.reset(learning_rate=1e-3)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch * steps, image_size, image_size, 3), dtype=np.uint8)
    y = rng.integers(0, 4, len(x))
    ds = make_dataset(x, y, batch, training=True)
    trainer.train_epoch(ds)  # trace
    start, cpu = time.perf_counter(), _cpu_seconds()
    for _ in range(2):
        trainer.train_epoch(ds)
    epoch = 2 * len(x) / (time.perf_counter() - start)
    cpu_ms = (_cpu_seconds() - cpu) / (2 * len(x)) * 1000
    start = time.perf_counter()
    for _ in ds:
        pass
    pipeline = (time.perf_counter() - start) / steps * 1000
    xb, yb = tf.constant(x[:batch], tf.float32), tf.constant(y[:batch])
    [v.numpy() for v in trainer._train_step(xb, yb)]
    start = time.perf_counter()
    for _ in range(10):
        [v.numpy() for v in trainer._train_step(xb, yb)]
    step = (time.perf_counter() - start) / 10 * 1000
    import leukofed

    return {"epoch_images_per_s": epoch, "cpu_ms_per_image": cpu_ms, "step_ms": step,
            "pipeline_ms": pipeline,
            "code": str(Path(leukofed.__file__).parent.parent)}


def run_side(tree: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, __file__, "--one"], cwd=tree, env=env, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()
    return json.loads(out[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/train-speed.json"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure()))
        return
    doc = header()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    doc.update(model="compact_cnn", image_size=128, batch_size=32, repeats=args.repeats,
               base=args.base, head=f"{head} + working tree", rows=[])
    runs: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree),
                        args.base], check=True, capture_output=True)
        try:
            for i in range(args.repeats):  # alternated: drift touches both sides alike
                for side, where in (("base", tree), ("head", ROOT)):
                    runs[side].append(run_side(where))
                    print(f"repeat {i + 1}/{args.repeats} {side}: {runs[side][-1]}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           capture_output=True)
    for side, measured in runs.items():
        doc["rows"].append({"side": side, "revision": args.base if side == "base" else doc["head"],
                            "runs": measured,
                            **{k: float(np.median([m[k] for m in measured]))
                               for k in measured[0] if k != "code"}})
    base, head_row = doc["rows"]
    doc["epoch_speedup"] = head_row["epoch_images_per_s"] / base["epoch_images_per_s"]
    doc["cpu_per_image_ratio"] = base["cpu_ms_per_image"] / head_row["cpu_ms_per_image"]
    print("| side | epoch images/s | CPU ms per image | train step ms | pipeline ms per batch |")
    print("|---|---|---|---|---|")
    for row in doc["rows"]:
        print(f"| {row['side']} ({row['revision']}) | {row['epoch_images_per_s']:.0f} | "
              f"{row['cpu_ms_per_image']:.2f} | {row['step_ms']:.0f} | {row['pipeline_ms']:.0f} |")
    print(f"epoch speed-up: {doc['epoch_speedup']:.2f}x; CPU per image: "
          f"{doc['cpu_per_image_ratio']:.2f}x less")
    write_json(args.out, doc)


if __name__ == "__main__":
    main()
