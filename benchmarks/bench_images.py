"""Image sizes and build times, cold and cached, side by side in one run (make bench-images).

1. cold: the leukofed images and the build cache removed (the base image kept unless
   --with-base), then `scripts/images.sh` builds every target the stack runs;
2. cached: the same command again, nothing changed;
3. code change: one line of leukofed/ changed (and restored), the same command again: what a
   developer waits for after an edit (the dependency layers stay cached).

Writes benchmarks/results/images.json and docs/benchmarks-images.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["client", "aggregator", "inference", "mlflow"]
RESULTS = ROOT / "benchmarks/results/images.json"
DOC = ROOT / "docs/benchmarks-images.md"
TOUCHED = ROOT / "leukofed/__init__.py"


def build(label: str) -> dict:
    out = ROOT / f"benchmarks/results/.images-{label}.json"
    started = time.monotonic()
    subprocess.run(["bash", "scripts/images.sh", *TARGETS], cwd=ROOT, check=True,
                   env={**os.environ, "IMAGES_RESULTS": str(out)})
    doc = json.loads(out.read_text())
    out.unlink()
    doc["total_s"] = round(time.monotonic() - started, 1)
    return doc


def clean(with_base: bool) -> None:
    images = subprocess.run(["docker", "images", "-q", "--filter", "reference=leukofed/*"],
                            capture_output=True, text=True, check=True).stdout.split()
    keep = set() if with_base else set(subprocess.run(
        ["docker", "images", "-q", "leukofed/base"], capture_output=True, text=True).stdout.split())
    drop = sorted(set(images) - keep)
    if drop:
        subprocess.run(["docker", "rmi", "-f", *drop], check=True, capture_output=True)
    subprocess.run(["docker", "builder", "prune", "-af"], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--with-base", action="store_true",
                        help="also remove the debootstrap base (adds its ~40 s)")
    args = parser.parse_args()
    clean(args.with_base)
    cold = build("cold")
    cached = build("cached")
    original = TOUCHED.read_text()
    try:
        TOUCHED.write_text(original + "\n# bench-images: a code change\n")
        code = build("code")
    finally:
        TOUCHED.write_text(original)
    doc = {"command": "make bench-images", "machine": f"{platform.machine()}, "
           f"{os.cpu_count()} cores, {platform.node()}", "base": cold["base"],
           "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "runs": {"cold": cold, "cached": cached, "code_change": code}}
    RESULTS.write_text(json.dumps(doc, indent=1))
    rows = []
    by = {k: {i["target"]: i for i in v["images"]} for k, v in doc["runs"].items()}
    for target in TARGETS:
        c, w, e = (by[k][target] for k in ("cold", "cached", "code_change"))
        code = "—" if c["code_layer_bytes"] is None else f"{c['code_layer_bytes'] / 1e6:,.1f} MB"
        rows.append(f"| `leukofed/{target}` | {c['bytes'] / 1e6:,.0f} MB "
                    f"| {code} | {c['build_s']:.0f} s "
                    f"| {w['build_s']:.1f} s | {e['build_s']:.1f} s |")
    totals = {k: v["total_s"] for k, v in doc["runs"].items()}
    DOC.write_text(f"""# Container images: size and build time

Produced by `make bench-images` on {doc['date'][:10]} ({doc['machine']}; base
`{doc['base']}`, Docker engine with BuildKit). One run, three builds of the same targets
side by side: cold (leukofed images and build cache removed, the base kept), cached (nothing
changed), and after a one-line change in `leukofed/` (dependency layers stay cached; only
the code layers and the final copy of each venv are redone). Raw numbers:
`benchmarks/results/images.json`.

| image | size | code layer | cold build | cached | after a code change |
|---|---|---|---|---|---|
{chr(10).join(rows)}
| **all four** (`scripts/images.sh`, wall time) | | | {totals['cold']:.0f} s \
| {totals['cached']:.0f} s | {totals['code_change']:.0f} s |

Cached / cold: {totals['cached'] / totals['cold']:.2f}; code change / cold:
{totals['code_change'] / totals['cold']:.2f}.

- The dependencies (`/opt/venv`, from the lock) and leukofed itself (`/opt/app`) are
  separate layers: after a code change only the top layer is rebuilt, and an upgrade of a
  hospital's client pulls that layer ("code layer" above).
- The client is TensorFlow (1.9 GB of its size), Celery and the core; no aggregator,
  inference or MLflow code. The aggregator holds the whole core with TensorFlow, tf2onnx and
  MLflow: what the inference image held before it dropped TensorFlow (issue 10). The
  inference image is onnxruntime, FastAPI, the MLflow client and the core.
- Where no registry is reachable the base is made by `debootstrap` (about 40 s, 124 MB) and
  Redis and PostgreSQL come from Debian's packages (targets `redis`, `postgres`).
- The GPU targets (`client-gpu`: TensorFlow with CUDA from PyPI; `inference-gpu`:
  onnxruntime-gpu with CUDA and cuDNN wheels) are not in this table: several GB of
  downloads each; their sizes and build times are in docs/operator.md.
""")
    print(DOC.read_text())


if __name__ == "__main__":
    main()
