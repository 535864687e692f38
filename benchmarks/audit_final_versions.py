"""The shortcut audit of each scenario's final version, measured the same way for every row.

The aggregator audits a version against the class stains its hospitals report. Under
example-level differential privacy hospitals report no stain or acquisition statistics
(they would sit outside the guarantee), so a DP version carries no colour audit, and a
table of privacy levels would compare rows audited and not. This script audits every
final version of a ``bench_federated.py`` results file after the fact, identically: it
starts MLflow on the scenario's own run folder, loads the final version, takes the class
stain targets from the hospitals' images under their simulated laboratories (what the
hospitals' sums would give, here over all their images) and the colour-histogram forest
cross-fitted on the test split (as the aggregator does), and writes
``final.audit_offline`` into the results file.

    .venv/bin/python benchmarks/audit_final_versions.py benchmarks/results/federated-example-dp.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_federated import ROOT, VENV  # noqa: E402
from common import write_json  # noqa: E402

PORT = 5095


def stain_targets(hospitals: Path, size: int) -> Any:
    """Class stain targets pooled over the training hospitals' images under their labs."""
    from leukofed.audit import stain_sums, targets_from_sums
    from leukofed.data import scan_dataset
    from leukofed.labels import CLASSES
    from leukofed.labs import ACQUISITION_FILE, UNSEEN_LAB_DIR, load_acquisition
    from leukofed.train import load_arrays

    parts = []
    for h in sorted(p for p in hospitals.iterdir() if p.is_dir() and p.name != UNSEEN_LAB_DIR):
        lab = h / ACQUISITION_FILE
        x, y = load_arrays(scan_dataset(h, verify=False).records, size,
                           acquisition=load_acquisition(lab) if lab.is_file() else None)
        parts.append(stain_sums(x, y, len(CLASSES)))
    return targets_from_sums(parts, len(CLASSES))


def audit_scenario(s: dict[str, Any], split: Path) -> dict[str, float]:
    import mlflow

    from leukofed.audit import histogram_crossfit, prepare_audit_set, run_audit
    from leukofed.splits import read_manifest
    from leukofed.train import load_arrays
    from registry.model_versions import DEFAULT_MODEL_NAME, load_version
    from services.aggregator.keras_ops import predict_in_batches

    run = ROOT / ".run" / "bench-federated" / s["scenario"] / "run"
    store = run / "mlflow"
    server = subprocess.Popen(
        [str(VENV / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(PORT),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{PORT}"
        mlflow.set_tracking_uri(url)
        for _ in range(120):
            try:
                mlflow.MlflowClient().search_registered_models(max_results=1)
                break
            except Exception:  # not up yet
                time.sleep(0.5)
        version = s["final"]["version"]
        model = load_version(version, DEFAULT_MODEL_NAME).model
        size = s["image_size"]
        x, y = load_arrays(read_manifest(split).test, size)
        targets = stain_targets(run.parent / "hospitals", size)
        audit = prepare_audit_set(x, y, targets, histogram_crossfit(x, y))
        return run_audit(lambda images: predict_in_batches(model, images), audit)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="a bench_federated.py results JSON")
    p.add_argument("--split", default=str(ROOT / ".run" / "bench-federated" / "split.json"))
    args = p.parse_args()
    path = Path(args.results)
    doc = json.loads(path.read_text())
    for s in doc["scenarios"]:
        if not s.get("final", {}).get("version"):
            print(f"{s['scenario']}: no final version, skipped", flush=True)
            continue
        m = audit_scenario(s, Path(args.split))
        s["final"]["audit_offline"] = m
        write_json(path, doc)
        print(f"{s['scenario']}: original {m['audit_original_accuracy']:.3f}, recoloured "
              f"{m['audit_recoloured_accuracy']:.3f} ({100 * m['audit_follow_colour']:.1f}% "
              f"follow the colour), forest {m['audit_histogram_accuracy']:.3f}", flush=True)


if __name__ == "__main__":
    main()
