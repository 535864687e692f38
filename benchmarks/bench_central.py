"""Centralized training from scratch on the real data with the block split.

For each model and recipe ("old": 64 px, flips and small colour jitter, the whole field;
"new", the default: 128 px, stain-robust augmentation, CellFocus): plain ``model.fit``
(JPEG decoded every epoch) vs leukofed's train step over cached arrays, images/s in the
same run; a full training with early stopping on validation macro-F1; test metrics beside
the shortcut audit (recoloured, spatially recoloured, background only, follow-the-colour,
colour-histogram forest), an unseen simulated laboratory and the share of images referred;
ONNX Runtime vs a tf.function Keras call at batch 1 and 32. Then the default recipe again
on other block splits (``--spread-seeds``), so its numbers come with a spread instead of
one draw of the split. Writes benchmarks/results/central.json and docs/benchmarks-central.md.

    make bench-central        # or: .venv/bin/python benchmarks/bench_central.py --data DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import (  # noqa: E402
    REFERRAL_KINDS,
    conformal_rows,
    header,
    now_iso,
    peak_rss_mib,
    robustness,
    write_json,
)

from leukofed.audit import audit_set_from_train  # noqa: E402
from leukofed.data import scan_dataset  # noqa: E402
from leukofed.export import INPUT_NAME, OUTPUT_NAME, cpu_session, export_onnx  # noqa: E402
from leukofed.labels import CLASSES  # noqa: E402
from leukofed.metrics import plot_confusion_matrix  # noqa: E402
from leukofed.models import build_model, model_metadata, save_model  # noqa: E402
from leukofed.ood import AcquisitionProfile, ProfileStats  # noqa: E402
from leukofed.splits import group_split  # noqa: E402
from leukofed.train import Trainer, evaluate, fit, load_arrays, make_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def plain_fit_images_per_s(name: str, size: int, records: list, steps: int, bs: int) -> float:
    """The baseline people write first (the brief's first probe): tf.data decodes and
    augments each image (flips, transpose, brightness) every epoch, then ``model.fit``."""
    paths = [str(r.path) for r in records]
    labels = [r.label for r in records]

    def load(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        img = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        img = tf.image.resize(tf.cast(img, tf.float32), (size, size))
        img = tf.image.random_flip_up_down(tf.image.random_flip_left_right(img))
        img = tf.cond(tf.random.uniform([]) < 0.5, lambda: tf.transpose(img, [1, 0, 2]),
                      lambda: img)
        img = tf.clip_by_value(tf.image.random_brightness(img, 0.08 * 255), 0.0, 255.0)
        return img, label

    ds = (tf.data.Dataset.from_tensor_slices((paths, labels)).shuffle(len(paths), seed=0)
          .map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(bs).repeat())
    model = build_model(name, size, seed=0)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # warm-up: tracing
    start = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps * bs / (time.perf_counter() - start)


def fast_images_per_s(name: str, size: int, x: np.ndarray, y: np.ndarray, steps: int,
                      bs: int) -> float:
    trainer = Trainer(build_model(name, size, seed=0))
    ds = make_dataset(x, y, bs, training=True).repeat()
    trainer.train_epoch(ds.take(3))
    return trainer.train_epoch(ds.take(steps))["images_per_s"]


def time_calls(fn: Any, x: np.ndarray, iters: int) -> float:
    fn(x)
    fn(x)
    start = time.perf_counter()
    for _ in range(iters):
        fn(x)
    return iters * len(x) / (time.perf_counter() - start)


def inference_speed(model: keras.Model, onnx_path: Path, x: np.ndarray) -> dict[str, Any]:
    session = cpu_session(onnx_path.read_bytes())
    keras_call = tf.function(lambda a: model(a, training=False))
    out: dict[str, Any] = {"onnx_providers": session.get_providers()}
    for batch, iters in ((1, 300), (32, 20)):
        xb = x[:batch].astype(np.float32)
        ort_ips = time_calls(lambda a: session.run([OUTPUT_NAME], {INPUT_NAME: a}), xb, iters)
        tff_ips = time_calls(lambda a: keras_call(tf.constant(a)).numpy(), xb, max(iters // 3, 5))
        out[f"batch{batch}"] = {"onnxruntime_images_per_s": ort_ips,
                                "keras_tf_function_images_per_s": tff_ips,
                                "onnxruntime_ms_per_batch": 1000 * batch / ort_ips,
                                "ratio": ort_ips / tff_ips}
    return out


RECIPES = {"old": {"augmentation": "basic", "cell_focus": False, "rotation_ensemble": False},
           "new": {"augmentation": "stain", "cell_focus": True, "rotation_ensemble": True}}


def run_config(name: str, size: int, epochs: int, recipe: str, data: dict[str, Any],
               args: Any, seed: int, spread: bool = False) -> dict:
    """One training and everything measured on it. ``spread``: a re-run on another block
    split, measured for the spread of the numbers (no throughput, no confusion PNG)."""
    print(f"\n== {name} @ {size}px, {recipe} recipe, up to {epochs} epochs, split seed "
          f"{seed}", flush=True)
    split = data["splits"][seed]
    arrays = {n: load_arrays(split[n], size) for n in ("train", "val", "test")}
    options = RECIPES[recipe]
    res: dict[str, Any] = {"model": name, "image_size": size, "batch_size": args.batch_size,
                           "recipe": recipe, "date": now_iso(), "seed": seed, "spread": spread,
                           "counts": [len(split[n]) for n in ("train", "val", "test")],
                           **options}
    if args.throughput_steps and not spread:
        base = plain_fit_images_per_s(name, size, split.train, args.throughput_steps,
                                      args.batch_size)
        fast = fast_images_per_s(name, size, *arrays["train"], args.throughput_steps,
                                 args.batch_size)
        res["throughput"] = {"plain_model_fit_images_per_s": base,
                             "leukofed_images_per_s": fast, "speedup": fast / base,
                             "steps": args.throughput_steps}
        print(f"  plain model.fit {base:.1f} img/s, leukofed {fast:.1f} img/s "
              f"({fast / base:.2f}x)", flush=True)
    net = build_model(name, size, seed=seed, cell_focus=options["cell_focus"],
                      rotation_ensemble=options["rotation_ensemble"])
    trainer = Trainer(net)
    result = fit(trainer, arrays["train"], arrays["val"], epochs, args.batch_size,
                 args.learning_rate, args.patience, seed=seed, progress=False,
                 augmentation=options["augmentation"],
                 on_epoch=lambda r: print(
                     f"  epoch {r['epoch']:>2} {r['train_seconds']:.1f}s "
                     f"train_acc {r['train_accuracy']:.3f} val_acc {r['val_accuracy']:.3f} "
                     f"val_f1 {r['val_macro_f1']:.3f}", flush=True))
    test = evaluate(trainer, *arrays["test"])
    epochs_run = result.history
    res.update({
        "epochs_run": len(epochs_run), "best_epoch": result.best_epoch,
        "seconds_per_epoch": float(np.mean([r["train_seconds"] for r in epochs_run])),
        "train_images_per_s": float(np.mean([r["train_images_per_s"] for r in epochs_run])),
        "train_seconds_total": result.seconds, "parameters": int(net.count_params()),
        "test": {k: test[k] for k in ("accuracy", "macro_f1", "macro_roc_auc", "ece",
                                      "malignant_sensitivity", "malignant_specificity",
                                      "confusion_matrix")},
        "test_recall": {c: test["per_class"][c]["recall"] for c in CLASSES},
        "history": epochs_run,
    })
    profile = AcquisitionProfile.from_stats(ProfileStats.of_images(arrays["train"][0]))
    audit_set = audit_set_from_train(*arrays["train"], *arrays["test"], len(CLASSES), seed)
    res["robustness"] = robustness(trainer.predict, audit_set, profile, *arrays["test"],
                                   seed=seed)
    res["conformal"] = conformal_rows(
        trainer.predict(arrays["val"][0]), arrays["val"][1], trainer.predict(arrays["test"][0]),
        arrays["test"][1], [v.refer for v in profile.judge_images(arrays["test"][0])])
    out_dir = ROOT / "artifacts" / "bench-central" / (
        f"{name}-{size}-{recipe}" + (f"-seed{seed}" if spread else ""))
    meta = model_metadata(net, name, size, {"dataset_fingerprint": data["fingerprint"],
                                            "acquisition_profile": profile.to_dict(),
                                            **options})
    save_model(net, out_dir / "model.keras", meta)
    if not spread:
        png_path = ROOT / "docs" / "img" / f"central-{name}-{size}-{recipe}-confusion.png"
        png = plot_confusion_matrix(test["confusion_matrix"], CLASSES, png_path,
                                    f"{name} @{size}px, {recipe} recipe, test split "
                                    "(block split)")
        res["confusion_png"] = str(png.relative_to(ROOT))
    report = export_onnx(net, meta, out_dir / "model.onnx", arrays["test"][0][:16])
    res["onnx"] = {"parity_max_abs_diff": report.max_abs_diff, "size_bytes": report.size_bytes,
                   "opset": report.opset}
    res["inference"] = inference_speed(net, report.path, arrays["test"][0][:32])
    res["peak_rss_mib_so_far"] = peak_rss_mib()
    t, a = res["test"], res["robustness"]["audit"]
    print(f"  test acc {t['accuracy']:.4f} macro-F1 {t['macro_f1']:.4f} ECE {t['ece']:.4f}; "
          f"recoloured {a['audit_recoloured_accuracy']:.3f}, follow-the-colour "
          f"{a['audit_follow_colour']:.3f}, unseen lab "
          f"{res['robustness']['unseen_lab']['accuracy']:.3f}; "
          f"ONNX/Keras batch1 {res['inference']['batch1']['ratio']:.1f}x", flush=True)
    return res


def robustness_table(results: list[dict[str, Any]]) -> list[str]:
    """What the accuracy means: the same models under the shortcut audit, an unseen
    laboratory, and the "refer" decision on images unlike the training data."""
    lines = [
        "| model | px | recipe | test acc | recoloured acc | spatial recolour acc "
        "| follow-the-colour | background-only acc | colour-histogram forest "
        "| unseen lab acc | referred: test | " + " | ".join(REFERRAL_KINDS) + " |",
        "|---" * (11 + len(REFERRAL_KINDS)) + "|"]
    for r in results:
        rob = r.get("robustness")
        if rob is None:
            continue
        a, ref = rob["audit"], rob["referred"]
        lines.append(
            f"| {r['model']} | {r['image_size']} | {r.get('recipe', 'old')} "
            f"| {a['audit_original_accuracy']:.3f} | {a['audit_recoloured_accuracy']:.3f} "
            f"| {a['audit_spatial_accuracy']:.3f} | {a['audit_follow_colour']:.3f} "
            f"| {a['audit_background_only_accuracy']:.3f} "
            f"| {a['audit_histogram_accuracy']:.3f} | {rob['unseen_lab']['accuracy']:.3f} "
            f"| {ref['in_distribution_test']:.3f} | "
            + " | ".join(f"{ref[k]:.2f}" for k in REFERRAL_KINDS) + " |")
    return lines


def spread_table(results: list[dict[str, Any]]) -> list[str]:
    """The default recipe on every block split it ran on, with the mean and the sample
    standard deviation: is a target met on the split, or on the splits?"""
    rows = [r for r in results if r.get("recipe") == "new" and "robustness" in r]
    if len(rows) < 2:
        return []
    def numbers(r: dict[str, Any]) -> list[float]:
        a, rob = r["robustness"]["audit"], r["robustness"]
        orig, rec = a["audit_original_accuracy"], a["audit_recoloured_accuracy"]
        return [r["test"]["accuracy"], r["test"]["macro_f1"], rec, 100 * (orig - rec),
                a["audit_follow_colour"], a["audit_spatial_accuracy"],
                100 * (orig - a["audit_spatial_accuracy"]), a["audit_histogram_accuracy"],
                rob["unseen_lab"]["accuracy"], rob["referred"]["in_distribution_test"],
                min(rob["referred"][k] for k in REFERRAL_KINDS), r["test"]["malignant_sensitivity"]]

    head = ["test acc", "macro-F1", "recoloured acc", "recoloured gap (points)",
            "follow-the-colour", "spatial acc", "spatial gap (points)", "colour forest",
            "unseen lab acc", "referred: test", "referred: lowest probe",
            "malignant sensitivity"]
    lines = ["## The default recipe across block splits", "",
             "The same recipe trained again on other draws of the block split (`--spread-seeds`"
             "; the seed shuffles which blocks of file numbers go to train, validation and "
             "test). One split's numbers are one draw; the mean and the sample standard "
             "deviation say what to expect of the next. Targets: test accuracy >= 0.96, "
             "macro-F1 >= 0.95, recoloured gap <= 3 points, follow-the-colour < 0.03, spatial "
             "gap <= 6 points, referred test <= 0.05, every probe >= 0.95.", "",
             "| split seed | train/val/test | " + " | ".join(head) + " |",
             "|---" * (2 + len(head)) + "|"]
    points = [h.endswith("(points)") for h in head]

    def cells(values: Any) -> str:
        return " | ".join(f"{v:.1f}" if pt else f"{v:.3f}" for v, pt in zip(values, points))

    table = []
    for r in sorted(rows, key=lambda r: r.get("seed", 0)):
        values = numbers(r)
        table.append(values)
        counts = "/".join(str(c) for c in r.get("counts", [])) or "n/a"
        lines.append(f"| {r.get('seed', 0)} | {counts} | {cells(values)} |")
    arr = np.array(table)
    for label, agg in (("mean", arr.mean(0)), ("sd", arr.std(0, ddof=1)),
                       ("worst", np.where([h in ("recoloured gap (points)", "follow-the-colour",
                                                 "spatial gap (points)", "colour forest",
                                                 "referred: test") for h in head],
                                          arr.max(0), arr.min(0)))):
        lines.append(f"| {label} | | {cells(agg)} |")
    return lines


def markdown(doc: dict[str, Any]) -> str:
    everything = doc["results"]
    doc = {**doc, "results": [r for r in everything if not r.get("spread")]}
    m = doc["machine"]
    lines = [
        "# Centralized baseline (from scratch, block split)", "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; "
        f"TF {m['versions'].get('tensorflow')}, onnxruntime {m['versions'].get('onnxruntime')}  ",
        f"Date: {doc['date']}; split: {doc['counts']} images (train/val/test), block size 16, "
        "deduplicated. Results: `benchmarks/results/central.json`.",
        *[f"Kept from an earlier run (`--keep-from`): {r['model']} @{r['image_size']} px, "
          f"{r.get('recipe', 'old')} recipe, measured {r['date']} on the same split."
          for r in doc["results"] if r.get("kept")], "",
        "| model | px | recipe | epochs (best) | test acc | macro-F1 | recall B/E/Pre/Pro | ECE "
        "| s/epoch | train img/s | vs plain fit | peak RSS MiB "
        "| ORT b1 img/s | Keras b1 | ratio b1 | ORT b32 | Keras b32 | ratio b32 |",
        "|---" * 18 + "|",
    ]
    for r in doc["results"]:
        t, inf = r["test"], r["inference"]
        rec = "/".join(f"{r['test_recall'][c]:.2f}" for c in CLASSES)
        speed = r.get("throughput", {})
        lines.append(
            f"| {r['model']} | {r['image_size']} | {r.get('recipe', 'old')} "
            f"| {r['epochs_run']} ({r['best_epoch']}) "
            f"| {t['accuracy']:.4f} | {t['macro_f1']:.4f} | {rec} | {t['ece']:.3f} "
            f"| {r['seconds_per_epoch']:.1f} | {r['train_images_per_s']:.0f} "
            f"| {speed.get('speedup', float('nan')):.2f}x "
            f"({speed.get('plain_model_fit_images_per_s', float('nan')):.0f} img/s) "
            f"| {r['peak_rss_mib_so_far']:.0f} "
            f"| {inf['batch1']['onnxruntime_images_per_s']:.0f} "
            f"| {inf['batch1']['keras_tf_function_images_per_s']:.0f} "
            f"| {inf['batch1']['ratio']:.1f}x | {inf['batch32']['onnxruntime_images_per_s']:.0f} "
            f"| {inf['batch32']['keras_tf_function_images_per_s']:.0f} "
            f"| {inf['batch32']['ratio']:.1f}x |")
    lines += ["", "ONNX Runtime used `CPUExecutionProvider` (no GPU here); \"Keras\" is a "
              "`tf.function`-compiled call of the same model. Peak RSS is the benchmark "
              "process's high-water mark up to that row. \"vs plain fit\" compares two "
              "30-step windows measured one after the other, so load that changes between "
              "them moves it (idle machine, 2026-11-27: 1.74x at 64 px). Confusion matrices: "
              + ", ".join(f"`{r['confusion_png']}`" for r in doc["results"]
                          if "confusion_png" in r), ""]
    lines += ["## What the accuracy means", "",
              "The same models, same test split. *Recoloured*: each test image moved to "
              "another class's average stain (Reinhard, training-split statistics); "
              "*follow-the-colour*: share of those answers naming the class whose stain the "
              "image now wears (target < 0.03); *spatial*: cells and background moved to two "
              "different classes' stains; *background only*: stained cells painted over "
              "(chance 0.25 is what a cell reader should get); *colour-histogram forest*: "
              "what colour alone achieves; *unseen lab*: test images under a simulated "
              "laboratory no model trained on (leukofed.labs, seed 0, inside the realistic "
              "range); *referred*: share of images the acquisition profile (leukofed.ood) "
              "sends to a hematologist (in-distribution test: lower is better, target <= "
              "0.05; every other column: higher is better, target >= 0.95).", ""]
    lines += robustness_table(doc["results"]) + [""]
    lines += conformal_table(doc["results"]) + [""]
    lines += spread_table(everything) + [""]
    return "\n".join(lines)


def conformal_table(results: list[dict[str, Any]]) -> list[str]:
    """What a clinician gets from each model: calibrated probabilities and prediction sets
    (leukofed.calibration), fitted on validation, measured on test."""
    lines = ["## Calibrated answers, prediction sets and \"refer\"", "",
             "Temperature and class-conditional conformal quantiles fitted on the validation "
             "split's sums (what hospitals send), measured on the test split. *Coverage*: "
             "share of test images whose prediction set holds the true class (overall, and "
             "the lowest class); *set refers*: sets of more or fewer than one class; "
             "*refers*: those or an image outside the acquisition profile; *accuracy "
             "answered*: on the images neither refers.", "",
             "| model | px | recipe | ECE test before -> after (T) | target | coverage "
             "(lowest class) | mean set size | set refers | refers | accuracy answered |",
             "|---" * 10 + "|"]
    for r in results:
        c = r.get("conformal")
        if c is None:
            continue
        for row in c["rows"]:
            low = min(v for v in row["class_coverage"] if v is not None)
            acc = row["accuracy_answered"]
            lines.append(
                f"| {r['model']} | {r['image_size']} | {r.get('recipe', 'old')} "
                f"| {c['test_ece_before']:.3f} -> {c['test_ece_after']:.3f} "
                f"({c['temperature']:.2f}) | {row['coverage_target']:.2f} "
                f"| {row['coverage']:.3f} ({low:.3f}) | {row['mean_set_size']:.2f} "
                f"| {row['set_refer_share']:.3f} | {row['refer_share']:.3f} "
                f"| {'n/a' if acc is None else f'{acc:.3f}'} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "all-pbs"))
    p.add_argument("--configs", default="compact_cnn:64:30:old,compact_cnn:128:90:new",
                   help="comma-separated model:size:max_epochs:recipe (recipe old or new)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--patience", type=int, default=25)
    p.add_argument("--throughput-steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0, help="the block split of the main tables")
    p.add_argument("--spread-seeds", default="1,2",
                   help="other block splits the new-recipe configs run on again ('' for none)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "central.json"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks-central.md"))
    p.add_argument("--keep-from", help="an earlier results file: its rows for models and "
                   "recipes not run now are kept (marked, with their date)")
    args = p.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"data folder not found: {args.data}")
    ds = scan_dataset(args.data)
    spread_seeds = [int(v) for v in args.spread_seeds.split(",") if v.strip()]
    splits = {seed: group_split(ds.records, seed=seed) for seed in [args.seed, *spread_seeds]}
    split = splits[args.seed]
    data = {"splits": splits, "fingerprint": ds.fingerprint}
    doc = header()
    doc["counts"] = [len(split.train), len(split.val), len(split.test)]
    doc["dataset_fingerprint"] = ds.fingerprint
    doc["results"] = []
    specs = [spec.split(":") for spec in args.configs.split(",")]
    if args.keep_from:
        earlier = json.loads(Path(args.keep_from).read_text())
        if earlier.get("dataset_fingerprint") != ds.fingerprint:
            sys.exit(f"{args.keep_from} was measured on other data")
        running = {(n, int(sz), (rest or ["new"])[0]) for n, sz, _, *rest in specs}
        doc["results"] = [{**r, "kept": True, "date": r.get("date", earlier["date"])}
                          for r in earlier["results"]
                          if (r["model"], r["image_size"], r.get("recipe", "old"))
                          not in running]
    runs = [(spec, args.seed, False) for spec in specs] + [
        (spec, seed, True) for seed in spread_seeds for spec in specs
        if (spec[3:] or ["new"])[0] == "new"]
    for (name, size, epochs, *recipe), seed, spread in runs:
        doc["results"].append(run_config(name, int(size), int(epochs),
                                         recipe[0] if recipe else "new", data, args, seed,
                                         spread))
        write_json(args.out, doc)  # after every model, so a long run keeps what it measured
        Path(args.doc).write_text(markdown(doc))
    Path(args.doc).write_text(markdown(doc))
    shutil.rmtree(ROOT / "artifacts" / "bench-central" / "tmp", ignore_errors=True)
    print(f"wrote {args.out} and {args.doc}")


if __name__ == "__main__":
    main()
