"""Micro-timings of a version's per-round work outside hospital training, each step in
isolation (no training, no stack): what docs/ml-engineer.md "What a round costs" reports.

    .venv/bin/python scripts/time_round_steps.py [DATA] [--image-size 128]

DATA (default ../shared/data/all-pbs) is split as `leukofed data split` does (seed 0) and
its test split plays the aggregator's. A few tens of seconds on 2 cores; the "before" rows
time what a version did before issue 25 (4 audit predictions, requirements inferred).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tick(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    print(f"{name:48s} {time.perf_counter() - start:7.2f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", nargs="?", default="../shared/data/all-pbs")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--model", default="compact_cnn")
    args = parser.parse_args()

    import mlflow.keras
    import mlflow.onnx
    import onnx

    from leukofed.audit import (
        class_stain_targets,
        histogram_crossfit,
        prepare_audit_set,
        run_audit,
    )
    from leukofed.card import build_card, card_html, card_markdown
    from leukofed.data import scan_dataset
    from leukofed.export import export_onnx
    from leukofed.gate import GateFloors
    from leukofed.metrics import classification_metrics
    from leukofed.models import build_model, model_metadata
    from leukofed.splits import group_split
    from leukofed.train import load_arrays
    from registry.model_versions import _requirements
    from registry.publish import save_mlflow_onnx
    from services.aggregator.audit_plan import audit_skipped
    from services.aggregator.config import RunConfig
    from services.aggregator.keras_ops import predict_in_batches

    size = args.image_size
    test = group_split(scan_dataset(args.data).records, seed=0).test
    x, y = load_arrays(test, size)
    print(f"{args.model} @{size}, {len(x)} server test images")
    model = build_model(args.model, size)
    predict_in_batches(model, x[:64])  # warm up

    def predict(images: np.ndarray) -> np.ndarray:
        return predict_in_batches(model, images)

    probs = tick("server test predictions", predict, x)
    histogram = tick("colour audit: histogram forest (once a split)", histogram_crossfit, x, y)
    audit = tick("colour audit: recolour (once a target set)", prepare_audit_set, x, y,
                 class_stain_targets(x, y, 4), histogram)
    tick("colour audit, before (4 x predict)", run_audit, predict, audit)
    tick("colour audit, now (3 x predict)", run_audit, predict, audit, probs)
    cm = classification_metrics(y, probs)["confusion_matrix"]
    tick("audit plan decision (gate on the server card)", audit_skipped, RunConfig(),
         GateFloors(), cm, None, None, False)
    card = tick("model card (1000 bootstrap draws)", build_card,
                {"model_name": "m", "version": "1", "test": {"confusion": cm}})
    tick("model card as Markdown and HTML", lambda: (card_markdown(card), card_html(card)))
    metadata = model_metadata(model, args.model, size, {})
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        tick("Keras model as an MLflow model", mlflow.keras.save_model, model, str(d / "k"),
             pip_requirements=_requirements())
        tick("ONNX export and parity check", export_onnx, model, metadata, d / "m.onnx", x[:8])
        tick("ONNX as an MLflow model, before (inferred)", mlflow.onnx.save_model,
             onnx.load(str(d / "m.onnx")), str(d / "old"))
        tick("ONNX as an MLflow model, now (pinned)", save_mlflow_onnx, d / "m.onnx",
             d / "new", x[:1])
    members = np.random.default_rng(0).integers(0, 255, (512, size, size, 3), np.uint8)
    tick("membership audit, a hospital (512 images)", predict, members)


if __name__ == "__main__":
    main()
