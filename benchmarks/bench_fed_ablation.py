"""Where the federation loses points: federated recipes beside centralized training on the
same images for the same passes, in one process (no broker, no MLflow: the maths only).

Each scenario partitions the block split's train+val images into hospitals exactly as
``leukofed data partition`` does, and each hospital keeps its own 70/15/15 block split as
the client service does (services/client/hospital.py), so it trains on its ``train`` part
only. The centralized reference trains on the union of those same training images (each
under its hospital's simulated laboratory when ``labs``), for rounds x local epochs
epochs, with the centralized schedule (cosine, class-balanced loss). A federated variant
runs the client's own ``local_fit`` at each hospital in turn and the aggregator's strategy
(leukofed.strategies) on the answers; the served model is the last round's.

Every final model gets its companions: the colour-histogram forest on the same split, the
recoloured accuracy and the share of answers following the colour (leukofed.audit), and
accuracy on a simulated laboratory no hospital has.

    .venv/bin/python benchmarks/bench_fed_ablation.py --scenarios 3,10 \
        --variants "constant:schedule=constant:la=0,default:schedule=cosine:la=1"

Writes benchmarks/results/federated-ablation.json and docs/benchmarks-federated-ablation.md
(``--append`` adds rows to an earlier run's file). Never run two of these at once here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import header, write_json

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("Benign", "Early", "Pre", "Pro")
DEFAULT_VARIANT = {"schedule": "cosine", "la": 1, "epochs": 2, "strategy": "fedavg",
                   "server_lr": 1.0, "momentum": 0.9, "bn": "average", "lr": 0.0,
                   "bncal": -1, "batch": 0, "norm": "batch"}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``name:key=value:...`` over DEFAULT_VARIANT (schedule constant|cosine, la 0|1,
    epochs N, strategy NAME, server_lr X and momentum M for fedavgm, bn average|local,
    lr X: the hospitals' base learning rate, 0 for --learning-rate; bncal 1|0: BatchNorm
    statistics measured on the new global weights and pooled, -1: as the aggregator's
    "auto" does, for every strategy but FedAvg/FedProx; batch N: the hospitals' batch size,
    0 for --batch-size; norm batch|group: the compact CNN's normalisation)."""
    name, *pairs = text.split(":")
    out = dict(DEFAULT_VARIANT)
    for pair in pairs:
        key, value = pair.split("=", 1)
        if key not in out:
            raise SystemExit(f"unknown variant key {key!r} in {text!r}")
        out[key] = type(out[key])(value) if not isinstance(out[key], str) else value
    return name, out


def load_scenario(args: Any, n: int, scheme: str) -> dict[str, Any]:
    from leukofed.data import scan_dataset
    from leukofed.labs import draw_labs, unseen_lab
    from leukofed.partition import partition_records
    from leukofed.splits import group_split
    from leukofed.train import load_arrays

    dataset = scan_dataset(args.data)
    split = group_split(dataset.records, seed=args.seed)
    parts = partition_records(split.train + split.val, n, scheme, args.alpha, seed=args.seed)
    labs = draw_labs(n, args.seed) if args.labs else {}
    hospitals = {}
    for h, records in parts.items():
        local = group_split(records, 0.15, 0.15, 0)  # the client's own split (split_seed 0)
        hospitals[h] = load_arrays(local.train, args.image_size, acquisition=labs.get(h))
    test = load_arrays(split.test, args.image_size)
    unseen = load_arrays(split.test, args.image_size, acquisition=unseen_lab(args.seed)) \
        if args.labs else None
    return {"hospitals": hospitals, "test": test, "unseen": unseen}


def final_report(trainer: Any, data: dict[str, Any], seed: int) -> dict[str, Any]:
    from leukofed.audit import audit_set_from_train, run_audit
    from leukofed.train import evaluate

    m = evaluate(trainer, *data["test"])
    out = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
           "recall": {c: m["per_class"][c]["recall"] for c in CLASSES}}
    x = np.concatenate([v[0] for v in data["hospitals"].values()])
    y = np.concatenate([v[1] for v in data["hospitals"].values()])
    out["audit"] = run_audit(trainer.predict, audit_set_from_train(x, y, *data["test"],
                                                                   len(CLASSES), seed))
    if data["unseen"] is not None:
        out["unseen_lab_accuracy"] = evaluate(trainer, *data["unseen"])["accuracy"]
    return out


def central(args: Any, data: dict[str, Any], epochs: int) -> dict[str, Any]:
    from leukofed.models import build_model
    from leukofed.train import Trainer, evaluate, fit

    x = np.concatenate([v[0] for v in data["hospitals"].values()])
    y = np.concatenate([v[1] for v in data["hospitals"].values()])
    trainer = Trainer(build_model("compact_cnn", args.image_size, seed=args.seed))
    curve: list[float] = []
    start = time.perf_counter()
    fit(trainer, (x, y), None, epochs, args.batch_size, args.learning_rate,
        patience=epochs + 1, seed=args.seed, progress=False,
        on_epoch=lambda row: curve.append(evaluate(trainer, *data["test"])["accuracy"]))
    out = final_report(trainer, data, args.seed)
    out.update(curve=curve, seconds=time.perf_counter() - start, images=int(len(y)))
    print(f"  central {epochs} epochs: {out['accuracy']:.4f}", flush=True)
    return out


def round_lr(base: float, schedule: str, server_round: int, rounds: int) -> float:
    from leukofed.strategies import round_learning_rate

    return round_learning_rate(base, schedule, server_round, rounds)


def federated(args: Any, data: dict[str, Any], v: dict[str, Any]) -> dict[str, Any]:
    from leukofed.models import build_model
    from leukofed.strategies import ClientResult, make_strategy
    from leukofed.train import Trainer, evaluate, local_fit, recalibrate_batchnorm
    from leukofed.wire import batchnorm_stat_names, set_model_weights, weights_from_model

    model = build_model("compact_cnn", args.image_size, seed=args.seed, norm=v["norm"])
    trainer = Trainer(model)
    params = {"server_lr": v["server_lr"], "momentum": v["momentum"]} \
        if v["strategy"] == "fedavgm" else {}
    strategy = make_strategy(v["strategy"], bn_mode=v["bn"],
                             bn_stat_names=batchnorm_stat_names(model), **params)
    global_w = weights_from_model(model)
    curve = []
    start = time.perf_counter()
    for rnd in range(1, args.rounds + 1):
        lr = round_lr(v["lr"] or args.learning_rate, v["schedule"], rnd, args.rounds)
        results = []
        for i, (h, (x, y)) in enumerate(data["hospitals"].items()):
            set_model_weights(model, global_w)
            local_fit(trainer, x, y, epochs=v["epochs"], batch_size=v["batch"] or args.batch_size,
                      learning_rate=lr, seed=args.seed * 1_000_003 + rnd * 101 + i,
                      logit_adjustment=bool(v["la"]))
            results.append(ClientResult(h, weights_from_model(model), int(len(x))))
        global_w = strategy.aggregate(global_w, results, rnd)
        set_model_weights(model, global_w)
        if v["bncal"] == 1 or (v["bncal"] == -1 and not strategy.weights_are_client_average):
            # The aggregator's BatchNorm calibration ("bn_calibration" auto): statistics
            # measured on the new weights, pooled over the hospitals' training images.
            recalibrate_batchnorm(model, np.concatenate([x for x, _ in
                                                         data["hospitals"].values()]))
            global_w = weights_from_model(model)
        m = evaluate(trainer, *data["test"])
        curve.append({"round": rnd, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                      "benign_recall": m["per_class"]["Benign"]["recall"], "lr": lr})
        print(f"  round {rnd:>2}/{args.rounds} lr {lr:.2e} test acc {m['accuracy']:.4f} "
              f"Benign recall {curve[-1]['benign_recall']:.3f}", flush=True)
    out = final_report(trainer, data, args.seed)
    out.update(curve=curve, seconds=time.perf_counter() - start)
    return out


def local_steps(train_images: dict[str, int], epochs: int, batch: int) -> float:
    """Optimizer steps a hospital makes in a round, on average over hospitals (make_dataset
    drops the last partial batch; a hospital smaller than a batch makes one step)."""
    return float(np.mean([epochs * max(1, n // batch) for n in train_images.values()]))


def markdown(doc: dict[str, Any]) -> str:
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "# Where the federation loses points (ablation, in-process)", "",
        f"Generated by `{doc['command']}` on {doc['date']} "
        f"({doc['machine']['cpu']}, {doc['machine']['cores']} cores). Same block split, "
        "each hospital's own 70/15/15 split as the client makes it, the centralized reference "
        "on the union of the hospitals' training images (under their laboratories), same "
        "passes. *colour forest*: a random forest on colour histograms, same split; "
        "*recoloured*: test images recoloured to another class's stain (share of answers "
        "following the colour); *unseen lab*: the test images under a laboratory no "
        "hospital has.", "",
        "| hospitals | partition | variant | rounds x epochs | test acc | gap to central "
        "(points) | macro-F1 | Benign recall | recoloured (follow colour) | colour forest | "
        "unseen lab | local steps / hospital / round | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in doc["scenarios"]:
        c = s["central"]
        rows = [("centralized", c, None)] + [(k, r, r) for k, r in s["variants"].items()]
        for name, r, fed in rows:
            a = r["audit"]
            gap = f"{100 * (c['accuracy'] - r['accuracy']):+.1f}" if fed else "-"
            steps = local_steps(s["train_images"], r["epochs"], r.get("config", {}).get("batch")
                                or doc.get("batch_size", 32)) if fed else 0.0
            budget = f"{s['rounds']} x {r['epochs']}" if fed else f"{r['epochs']} epochs"
            lines.append(
                f"| {s['hospitals']} | {s['partition']} | {name} | {budget} | "
                f"{f(r['accuracy'])} | {gap} | {f(r['macro_f1'])} | "
                f"{f(r['recall']['Benign'])} | {f(a['audit_recoloured_accuracy'])} "
                f"({100 * a['audit_follow_colour']:.1f}%) | "
                f"{f(a['audit_histogram_accuracy'])} | {f(r.get('unseen_lab_accuracy'))} | "
                f"{f'{steps:.1f}' if fed else '-'} | {r['seconds'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "all-pbs"))
    p.add_argument("--scenarios", default="3,10", help="HOSPITALS[:iid|dirichlet], comma list")
    p.add_argument("--variants", default="constant:schedule=constant:la=0,default")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-labs", dest="labs", action="store_false")
    p.add_argument("--append", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/federated-ablation.json"))
    p.add_argument("--doc", default=str(ROOT / "docs/benchmarks-federated-ablation.md"))
    args = p.parse_args()
    doc = header()
    doc["batch_size"] = args.batch_size
    doc["scenarios"] = []
    if args.append and Path(args.out).exists():
        earlier = json.loads(Path(args.out).read_text())
        doc["scenarios"] = earlier["scenarios"]
        doc["command"] = f"{earlier['command']}; {doc['command']}"
        doc["date"] = f"{earlier['date']}; {doc['date']}"
    variants = dict(parse_variant(t) for t in args.variants.split(","))
    for text in args.scenarios.split(","):
        n, scheme = (text.split(":") + ["dirichlet"])[:2]
        print(f"== {n} hospitals, {scheme}", flush=True)
        data = load_scenario(args, int(n), scheme)
        sizes = {h: int(len(v[1])) for h, v in data["hospitals"].items()}
        print(f"  training images per hospital: {sizes}", flush=True)
        scenario: dict[str, Any] = {
            "hospitals": int(n), "partition": f"{scheme}{args.alpha if scheme != 'iid' else ''}",
            "labs": args.labs, "rounds": args.rounds, "train_images": sizes,
            "class_counts": {h: np.bincount(v[1], minlength=4).tolist()
                             for h, v in data["hospitals"].items()},
            "variants": {}}
        epochs_ref = max(v["epochs"] for v in variants.values())
        before = next((e for e in doc["scenarios"] if (e["hospitals"], e["partition"], e["rounds"])
                       == (int(n), scenario["partition"], args.rounds)), None)
        if before and before["central"]["epochs"] == args.rounds * epochs_ref:
            scenario["central"] = before["central"]  # --append: the same reference, kept
            scenario["variants"] = before["variants"]
        else:
            scenario["central"] = central(args, data, args.rounds * epochs_ref)
            scenario["central"]["epochs"] = args.rounds * epochs_ref
        for name, v in variants.items():
            print(f"-- variant {name}: {v}", flush=True)
            r = federated(args, data, v)
            r.update(epochs=v["epochs"], config=v)
            scenario["variants"][name] = r
            print(f"  {name}: {r['accuracy']:.4f} (central {scenario['central']['accuracy']:.4f})",
                  flush=True)
            key = (int(n), scenario["partition"])
            doc["scenarios"] = [s for s in doc["scenarios"]
                                if (s["hospitals"], s["partition"]) != key] + [scenario]
            write_json(args.out, doc)
            Path(args.doc).write_text(markdown(doc))


if __name__ == "__main__":
    main()
