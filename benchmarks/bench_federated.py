"""Federated training on the real data, against centralized training with the same epochs.

Each scenario partitions the block split's train+val images into hospitals (the test
blocks are held out from every hospital and evaluated at the aggregator), starts the
stack as local processes (scripts/stack.sh: redis-server, MLflow, aggregator, one Celery
worker per hospital), runs a federated run through the REST API and records per round:
server-side test accuracy, macro-F1, per-class recall, seconds per round, orchestration
overhead, bytes per hospital; and, for the final model, the shortcut audit, accuracy per
hospital and on a simulated laboratory that never trained (scenarios with ``labs``: every
hospital has its own simulated acquisition, leukofed.labs), and the share of images the
model would refer. Writes benchmarks/results/federated.json, docs/benchmarks-federated.md
and per-round curves docs/img/federated-*.png.

    make bench-federated      # or: .venv/bin/python benchmarks/bench_federated.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import carry_earlier, header, referred_share, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv" / "bin"
CLASSES = ("Benign", "Early", "Pre", "Pro")
CALIBRATION_KEYS = ("calibration_temperature", "val_ece_before", "val_ece_after",
                    "test_conformal_coverage", "server_test_ece_before",
                    "server_test_ece_after", "server_test_conformal_coverage",
                    "server_test_set_refer_share", "server_test_accuracy_answered")


def sh(*cmd: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, text=True,
                          capture_output=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def prepare_split(data: str, seed: int) -> tuple[Path, dict[str, int]]:
    """The block split every scenario shares (test blocks held out at the aggregator), and
    the ports the benchmark's stacks use (apart from a stack `make up` may be running)."""
    work = ROOT / ".run" / "bench-federated"
    work.mkdir(parents=True, exist_ok=True)
    split = work / "split.json"
    sh(str(VENV / "leukofed"), "data", "split", data, str(split), "--seed", str(seed))
    return split, {"redis": 6390, "mlflow": 5090, "aggregator": 8091}


def scenario_name(s: dict[str, Any]) -> str:
    fp = "-fp16" if s["fp16"] else ""
    bn = "-fedbn" if s["bn_mode"] == "local" else ""
    if s.get("norm") == "group":
        bn += "-groupnorm"
    if s.get("privacy", {}).get("level") == "example":
        bn += f"-example-eps{s['privacy']['target_epsilon']:g}"
    elif s.get("privacy"):
        bn += f"-dp{s['privacy']['noise_multiplier']:g}"
    if s.get("bn_calibration") == "off":
        bn += "-nocal"
    if s.get("secure"):
        bn += "-secagg"
    if s.get("labs"):
        bn += "-labs"
    if s.get("recipe") == "old":
        bn += "-oldrecipe"
    alpha = f"{s['alpha']:g}" if s["scheme"] == "dirichlet" else ""
    params = "".join(f"-{k}{v:g}" for k, v in sorted(s.get("params", {}).items()))
    return f"{s['hospitals']}h-{s['scheme']}{alpha}-{s['strategy']}{params}{fp}{bn}"


@dataclass
class Hooks:
    """What a scenario does beyond the plain run (bench_join.py: a laboratory that joins).
    ``prepare(hospitals_dir)`` after the partition; ``first_ids``: the hospitals whose
    workers start with the stack (None: all); ``min_fit``: the run's quorum (None: every
    hospital); ``on_round(round, record, env)`` after each finished round, the stack still
    up (record: the run's, with its registered versions; env: the stack's)."""

    prepare: Callable[[Path], None] | None = None
    first_ids: list[str] | None = None
    min_fit: int | None = None
    on_round: Callable[[int, dict[str, Any], dict[str, str]], None] | None = None
    config: dict[str, Any] | None = None  # run-configuration keys to add or override


def run_scenario(s: dict[str, Any], args: Any, split: Path, ports: dict[str, int],
                 hooks: Hooks | None = None) -> dict:
    hooks = hooks or Hooks()
    name = scenario_name(s)
    work = ROOT / ".run" / "bench-federated" / name
    env = {"RUN_DIR": str(work / "run"), "REDIS_PORT": str(ports["redis"]),
           "MLFLOW_PORT": str(ports["mlflow"]), "AGGREGATOR_PORT": str(ports["aggregator"]),
           "HOSPITAL_DATA": str(work / "hospitals"), "SERVER_TEST_MANIFEST": str(split)}
    virtual = s["hospitals"] > args.virtual_above
    if virtual:
        # One TensorFlow process per hospital would not fit in memory: virtual hospitals
        # (services/client/virtual.py) train them one after another in one process.
        env["VIRTUAL_WORKERS"] = "1"
    print(f"\n== {name}", flush=True)
    table = sh(str(VENV / "leukofed"), "data", "partition", args.data, str(work / "hospitals"),
               "--hospitals", str(s["hospitals"]), "--scheme", s["scheme"], "--alpha",
               str(s["alpha"]), "--seed", str(args.seed), "--split-manifest", str(split),
               "--force", *(["--labs", "--lab-seed", str(args.seed)] if s.get("labs") else []))
    print(table, flush=True)
    if hooks.prepare:
        hooks.prepare(work / "hospitals")
    sh("scripts/stack.sh", "up", env={
        **env, **({"HOSPITAL_IDS": ",".join(hooks.first_ids)} if hooks.first_ids else {})})
    api = f"http://127.0.0.1:{ports['aggregator']}"
    try:
        ids = sorted(p.name for p in (work / "hospitals").iterdir()
                     if p.is_dir() and p.name != "unseen-lab")
        old = s.get("recipe") == "old"
        size = 64 if old else args.image_size
        config = {"name": f"bench {name}", "model": args.model, "image_size": size,
                  "augmentation": "basic" if old else "stain", "cell_focus": not old,
                  "rotation_ensemble": not old,
                  "rounds": args.rounds, "local_epochs": args.local_epochs,
                  "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                  "strategy": s["strategy"], "strategy_params": s.get("params", {}),
                  "bn_mode": s["bn_mode"], "privacy": s.get("privacy"),
                  "norm": s.get("norm", "batch"),
                  "bn_calibration": s.get("bn_calibration", "auto"),
                  "hospitals": ids, "min_fit_clients": hooks.min_fit or len(ids),
                  "round_deadline_s": 1800,
                  "seed": args.seed, "fp16": s["fp16"], "jit_compile": False,
                  "server_test_manifest": str(split), "register_models": True,
                  "secure_aggregation": "on" if s.get("secure") else "off"}
        config.update(hooks.config or {})
        run = httpx.post(f"{api}/v1/runs", json=config, timeout=30)
        run.raise_for_status()
        run_id = run.json()["id"]
        started = time.monotonic()
        seen = 0
        while True:
            rec = httpx.get(f"{api}/v1/runs/{run_id}", timeout=30).json()
            for r in rec["history"][seen:]:
                # A round shows in the history a moment before its version is registered:
                # a hook that reads the version waits for the next poll.
                if hooks.on_round and str(r["round"]) not in rec.get("versions", {}):
                    break
                g = r["global"]
                print(f"  round {r['round']:>2}  test acc {g.get('server_test_accuracy', 0):.4f}"
                      f"  macro-F1 {g.get('server_test_macro_f1', 0):.4f}"
                      f"  {r['timings']['round_s']:.1f}s", flush=True)
                if hooks.on_round:
                    hooks.on_round(r["round"], rec, env)
                seen += 1
            if rec["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(2)
        wall = time.monotonic() - started
        final: dict[str, Any] = {}
        if rec["status"] == "completed":
            try:
                final = final_model_report(rec, ports, split, size, work / "hospitals",
                                           args.seed)
            except Exception as exc:  # keep the run's numbers even if the read-back fails
                print(f"  final model report failed: {type(exc).__name__}: {exc}", flush=True)
                final = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        sh("scripts/stack.sh", "down", env=env)
    if rec["status"] != "completed":
        raise RuntimeError(f"{name}: run {rec['status']}: {rec.get('reason')}")
    rounds = []
    for r in rec["history"]:
        g = r["global"]
        rounds.append({
            "round": r["round"],
            "test_accuracy": g.get("server_test_accuracy"),
            "test_macro_f1": g.get("server_test_macro_f1"),
            "test_recall": {c: g.get(f"server_test_recall_{c}") for c in CLASSES},
            "federated_eval_accuracy": g.get("test_accuracy"),
            "round_s": r["timings"]["round_s"], "fit_wall_s": r["timings"]["fit_wall_s"],
            "slowest_client_s": r["timings"]["slowest_client_s"],
            "overhead_s": r["timings"]["overhead_s"], "eval_s": r["timings"]["eval_s"],
            "bytes_per_hospital": r["bytes"],
            "dp_epsilon": g.get("dp_epsilon"),
            "participants": sorted(r["hospitals"]),
        })
    last = rec["history"][-1]
    final["audit"] = {k: v for k, v in last["global"].items() if k.startswith("audit_")}
    # The membership-inference audit (leukofed.membership; run on the last round) and the
    # clinical pair, for the privacy table (benchmarks/privacy_table.py).
    final["membership"] = {k: v for k, v in last["global"].items()
                           if k.startswith("membership_")}
    final["malignant"] = {k: last["global"].get(f"server_test_malignant_{k}")
                          for k in ("sensitivity", "specificity")}
    final["hospital_test_accuracy"] = {h: m.get("test_accuracy")
                                       for h, m in last["hospitals"].items()}
    # Calibration fitted from the hospitals' validation sums, measured on the server test.
    final["calibration"] = {k: last["global"].get(k) for k in CALIBRATION_KEYS}
    return {"scenario": name, **s, "image_size": size, "partition_table": table,
            "batch_size": args.batch_size, "local_epochs": args.local_epochs,
            "virtual_hospitals": virtual,
            "run_id": run_id, "wall_s": wall, "rounds": rounds, "final": final}


def score_under_lab(model: Any, profile: Any, split: Path, size: int, lab_file: Path
                    ) -> dict[str, Any]:
    """Accuracy, macro-F1 and referred share of ``model`` on the test split rendered under a
    simulated laboratory (an acquisition file); ``profile``: the version's acquisition
    profile (None: no refer check, referred None)."""
    from leukofed.labs import load_acquisition
    from leukofed.metrics import classification_metrics
    from leukofed.splits import read_manifest
    from leukofed.train import load_arrays
    from services.aggregator.keras_ops import predict_in_batches

    x, y = load_arrays(read_manifest(split).test, size, acquisition=load_acquisition(lab_file))
    m = classification_metrics(y, predict_in_batches(model, x))
    return {"accuracy": float(m["accuracy"]), "macro_f1": float(m["macro_f1"]),
            "referred": None if profile is None else referred_share(profile, x)}


def final_model_report(rec: dict[str, Any], ports: dict[str, int], split: Path, size: int,
                       hospitals: Path, seed: int) -> dict[str, Any]:
    """The final round's registered model, read back from MLflow: accuracy on the test
    blocks under the unseen laboratory (when the partition has one) and the share of images
    it would refer (its own acquisition profile, leukofed.ood; probes: leukofed.probes)."""
    import mlflow

    from leukofed.labs import ACQUISITION_FILE, UNSEEN_LAB_DIR
    from leukofed.ood import AcquisitionProfile
    from leukofed.probes import probe_sets
    from leukofed.splits import read_manifest
    from leukofed.train import load_arrays
    from registry.model_versions import DEFAULT_MODEL_NAME, load_version

    mlflow.set_tracking_uri(f"http://127.0.0.1:{ports['mlflow']}")
    version = rec["versions"][str(rec["history"][-1]["round"])]
    loaded = load_version(version, os.environ.get("LEUKOFED_AGGREGATOR_MODEL_NAME",
                                                  DEFAULT_MODEL_NAME))
    profile_dict = loaded.metadata.get("acquisition_profile")
    profile = AcquisitionProfile.from_dict(profile_dict) if profile_dict else None
    x, y = load_arrays(read_manifest(split).test, size)

    def referred(images: np.ndarray) -> float | None:
        if profile is None:
            return None
        return referred_share(profile, images)

    out: dict[str, Any] = {"version": version,
                           "referred": {"in_distribution_test": referred(x)}}
    subset = x[:: max(1, len(x) // 120)][:120]
    out["referred"].update({k: referred(v) for k, v in probe_sets(subset, seed).items()})
    def under(lab_file: Path) -> dict[str, Any]:
        return score_under_lab(loaded.model, profile, split, size, lab_file)

    lab_file = hospitals / UNSEEN_LAB_DIR / ACQUISITION_FILE
    if lab_file.is_file():
        out["unseen_lab"] = under(lab_file)
        # The same test images under each training hospital's laboratory: the comparison
        # with the unseen laboratory then differs by the acquisition alone, not also by
        # each hospital's own (label-skewed) test split.
        out["training_labs"] = {
            p.name: under(p / ACQUISITION_FILE)["accuracy"] for p in sorted(hospitals.iterdir())
            if p.name != UNSEEN_LAB_DIR and (p / ACQUISITION_FILE).is_file()}
    return out


def centralized(args: Any, split: Path) -> dict[str, Any]:
    """Same model, same total epochs (rounds x local epochs), on the union of the train
    splits, evaluated on the same held-out test blocks."""
    from leukofed.models import build_model
    from leukofed.splits import read_manifest
    from leukofed.train import Trainer, evaluate, fit, load_arrays

    sp = read_manifest(split)
    tr, te = load_arrays(sp.train + sp.val, args.image_size), load_arrays(sp.test, args.image_size)
    epochs = args.rounds * args.local_epochs
    trainer = Trainer(build_model(args.model, args.image_size, seed=args.seed))
    curve = []

    def after_epoch(row: dict[str, Any]) -> None:
        m = evaluate(trainer, *te)
        curve.append({"epoch": row["epoch"], "test_accuracy": m["accuracy"],
                      "test_macro_f1": m["macro_f1"], "seconds": row["train_seconds"]})
        print(f"  central epoch {row['epoch']:>2} test acc {m['accuracy']:.4f}", flush=True)

    fit(trainer, tr, None, epochs, args.batch_size, args.learning_rate, patience=epochs + 1,
        seed=args.seed, progress=False, on_epoch=after_epoch)
    final = evaluate(trainer, *te)
    return {"epochs": epochs, "curve": curve, "test_accuracy": final["accuracy"],
            "test_macro_f1": final["macro_f1"],
            "test_recall": {c: final["per_class"][c]["recall"] for c in CLASSES}}


def same_images_central(args: Any, s: dict[str, Any]) -> dict[str, Any]:
    """The scenario's own centralized reference: the same model and recipe trained for the
    same passes (rounds x local epochs) on the union of the images its hospitals train on
    (each hospital's own 70/15/15 split, under its simulated laboratory), evaluated on the
    same test blocks, with the same audit; bench_fed_ablation's reference, so the two
    harnesses' gaps mean the same thing. The union of the block split's train+val that
    ``centralized`` trains on holds about half again as many images."""
    from types import SimpleNamespace

    from bench_fed_ablation import central, load_scenario

    ns = SimpleNamespace(data=args.data, seed=args.seed, alpha=args.alpha, labs=s["labs"],
                         image_size=args.image_size, batch_size=args.batch_size,
                         learning_rate=args.learning_rate)
    data = load_scenario(ns, s["hospitals"], s["scheme"])
    ref = central(ns, data, args.rounds * args.local_epochs)
    ref.pop("wrong_by_block", None)
    return {"reference": "same_images", "epochs": args.rounds * args.local_epochs,
            "test_accuracy": ref["accuracy"], **ref}


def summarise(res: dict[str, Any], central_acc: float) -> dict[str, Any]:
    rounds = res["rounds"]
    last = rounds[-1]
    reach = next((r["round"] for r in rounds if (r["test_accuracy"] or 0) >= 0.95), None)
    t_reach = sum(r["round_s"] for r in rounds[:reach]) if reach else None
    overhead = [r["overhead_s"] / r["round_s"] for r in rounds if r["round_s"]]
    per_h = [np.mean(list(r["bytes_per_hospital"].values())) for r in rounds]
    return {"final_test_accuracy": last["test_accuracy"],
            "final_test_macro_f1": last["test_macro_f1"],
            "best_test_accuracy": max(r["test_accuracy"] or 0 for r in rounds),
            "final_recall": last["test_recall"],
            "gap_to_central_points": 100 * (central_acc - (last["test_accuracy"] or 0)),
            "mean_round_s": float(np.mean([r["round_s"] for r in rounds])),
            "mean_overhead_share": float(np.mean(overhead)) if overhead else None,
            "mean_bytes_per_hospital_round": float(np.mean(per_h)),
            "round_reaching_0.95": reach, "seconds_to_0.95": t_reach,
            "dp_epsilon": last.get("dp_epsilon")}


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for res in doc["scenarios"]:
        xs = [r["round"] for r in res["rounds"]]
        axes[0].plot(xs, [r["test_accuracy"] for r in res["rounds"]], label=res["scenario"])
        axes[1].plot(xs, [r["test_macro_f1"] for r in res["rounds"]], label=res["scenario"])
    c = doc["centralized"]
    le = doc["config"]["local_epochs"]
    xs = [p["epoch"] / le for p in c["curve"]]
    axes[0].plot(xs, [p["test_accuracy"] for p in c["curve"]], "k--", label="centralized")
    axes[1].plot(xs, [p["test_macro_f1"] for p in c["curve"]], "k--", label="centralized")
    for ax, title in zip(axes, ("test accuracy", "test macro-F1"), strict=True):
        ax.set_xlabel("round (centralized: epochs / local epochs)")
        ax.set_title(title)
        ax.set_ylim(0.2, 1.0)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def privacy_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Final and best test accuracy per noise multiplier, sorted by epsilon (None: no noise);
    client-level scenarios only (example-level ones: ``level`` "example", their epsilon is
    the largest hospital's and each hospital calibrates its own noise)."""
    rows = [{"scenario": r["scenario"], "noise_multiplier": r["privacy"]["noise_multiplier"],
             "epsilon": r["summary"]["dp_epsilon"],
             "final_test_accuracy": r["summary"]["final_test_accuracy"],
             "best_test_accuracy": r["summary"]["best_test_accuracy"]}
            for r in doc["scenarios"]
            if r.get("privacy") and r["privacy"].get("level", "client") == "client"]
    return sorted(rows, key=lambda r: (r["epsilon"] is None, r["epsilon"] or 0.0))


def plot_epsilon(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in privacy_rows(doc) if r["epsilon"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    eps = [r["epsilon"] for r in rows]
    ax.plot(eps, [r["final_test_accuracy"] for r in rows], "o-", label="final round")
    ax.plot(eps, [r["best_test_accuracy"] for r in rows], "s--", label="best round")
    for r in rows:
        ax.annotate(f"z={r['noise_multiplier']:g}", (r["epsilon"], r["final_test_accuracy"]),
                    textcoords="offset points", xytext=(4, 6), fontsize=7)
    for r in privacy_rows(doc):
        if r["epsilon"] is None:
            ax.axhline(r["final_test_accuracy"], color="k", ls=":",
                       label="clipping only, no noise (epsilon infinite)")
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon at delta 1e-5 after {doc['config']['rounds']} rounds (log)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Client-level DP, 3 hospitals: accuracy against epsilon")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def central_cell(res: dict[str, Any], union: dict[str, Any]) -> str:
    """The accuracy a scenario's gap is measured from, and which reference it is."""
    own = res.get("central")
    if own:
        return (f"{own['test_accuracy']:.3f}: same images ({own.get('images', '?')} images, "
                f"{own['epochs']} epochs)")
    return f"{union['test_accuracy']:.3f}: union of train splits"


def markdown(doc: dict[str, Any]) -> str:
    cfg, m, c = doc["config"], doc["machine"], doc["centralized"]
    private = any(r.get("privacy") for r in doc["scenarios"])
    lines = [
        "# Federated training benchmark (real data, block split, test blocks held out)", "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB (all hospitals, the "
        "aggregator, Redis and MLflow share it)  ",
        f"Date: {doc['date']}. Model {cfg['model']} @{cfg['image_size']} px, "
        f"{cfg['rounds']} rounds x {cfg['local_epochs']} local epochs, batch "
        f"{cfg['batch_size']}, lr {cfg['learning_rate']}. Results: "
        f"`{doc['results_json']}`; curves: `{doc['curves_png']}`.", "",
        f"Centralized, same model and {c['epochs']} epochs on the union of the train "
        f"splits: test accuracy **{c['test_accuracy']:.4f}**, macro-F1 "
        f"**{c['test_macro_f1']:.4f}**.", "",
        "Scenarios with a *same-images* reference (`--same-images-central`) are compared "
        "with their own: the same passes over the union of their hospitals' own training "
        "images, under their laboratories (bench_fed_ablation.py's reference).", "",
        "| scenario | final test acc | macro-F1 | recall B/E/Pre/Pro | gap to central (points) "
        "| central: reference | best acc | s/round | overhead share | KB/hospital/round "
        "| round (s) to 0.95 |" + (" epsilon (delta 1e-5) |" if private else ""),
        "|---" * (12 if private else 11) + "|",
    ]
    for res in doc["scenarios"]:
        s = res["summary"]
        rec = "/".join(f"{(s['final_recall'][k] or 0):.2f}" for k in CLASSES)
        reach = (f"{s['round_reaching_0.95']} ({s['seconds_to_0.95']:.0f})"
                 if s["round_reaching_0.95"] else "not reached")
        lines.append(
            f"| {res['scenario']} | {s['final_test_accuracy']:.4f} "
            f"| {s['final_test_macro_f1']:.4f} | {rec} | {s['gap_to_central_points']:+.1f} "
            f"| {central_cell(res, c)} "
            f"| {s['best_test_accuracy']:.4f} | {s['mean_round_s']:.1f} "
            f"| {100 * (s['mean_overhead_share'] or 0):.1f}% "
            f"| {s['mean_bytes_per_hospital_round'] / 1024:.0f} | {reach} |"
            + (f" {eps if (eps := s.get('dp_epsilon')) is None else round(eps, 2)} |"
               if private else ""))
    lines += ["", "Overhead share: (fit wall time − slowest hospital's own fit time) / round "
              "time, i.e. dispatch, transfer, validation and aggregation; the rest of a round "
              "is local training, federated evaluation, the server-side test evaluation and "
              "MLflow registration. Partitions (class counts per hospital) are in the JSON.", ""]
    if any(r.get("bn_calibration") == "off" for r in doc["scenarios"]):
        lines += ["`-nocal`: without the BatchNorm calibration step (`bn_calibration: off`); "
                  "the global model keeps the averaged statistics of the fit updates. Other "
                  "rows use the default (`auto`: calibration after every server step that is "
                  "not a plain average).", ""]
    lines += robustness_lines(doc)
    lines += calibration_lines(doc)
    lines += join_lines(doc)
    if doc.get("epsilon_png"):
        lines += ["## Accuracy against epsilon", "",
                  f"Plot: `{doc['epsilon_png']}`. Central mode, adaptive clipping (target "
                  "quantile 0.5), every hospital in every round (sampling rate 1); what the "
                  "numbers mean: `docs/security.md`, section Differential privacy.", "",
                  "| noise multiplier z | epsilon (delta 1e-5) | final test acc | best test acc |",
                  "|---|---|---|---|"]
        for r in privacy_rows(doc):
            e = "infinite (no noise)" if r["epsilon"] is None else f"{r['epsilon']:,.0f}"
            lines.append(f"| {r['noise_multiplier']:g} | {e} | {r['final_test_accuracy']:.4f} "
                         f"| {r['best_test_accuracy']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def f(v: Any) -> str:
    """A table cell: three decimals, or "-" when not measured."""
    return "-" if v is None else f"{float(v):.3f}"


def join_lines(doc: dict[str, Any]) -> list[str]:
    """The ``join`` sections (benchmarks/bench_join.py): a laboratory that joins, with the
    default probation and without it."""
    lines: list[str] = []
    for key, title in (("join", "A laboratory joins"),
                       ("join_without_probation", "A laboratory joins, without probation")):
        if doc.get(key):
            lines += one_join_lines(doc[key], title)
    return lines


def one_join_lines(j: dict[str, Any], title: str) -> list[str]:
    others = ", ".join(f"{h} {a:.3f}" for h, a in j["other_labs"].items())
    return [
        f"## {title}", "",
        f"`{j['command']}` ({j['date']}): {j['hospitals']} hospitals (Dirichlet, each its "
        f"own laboratory) train from round 1; hospital {j['joining_hospital']}, whose "
        f"laboratory lies outside the training range, starts its worker after round "
        f"{j['worker_started_after_round']} and first takes part in round "
        f"{j['first_round_with_joiner']} of {j['rounds']}. Judged on the aggregator's test "
        "images under each laboratory, by the version of the round before it joined and "
        "the final one (the refer check: each version's own acquisition profile).", "",
        "| | joining laboratory referred | joining laboratory accuracy | training "
        "laboratories' accuracy (mean) | training laboratories referred |",
        "|---|---|---|---|---|",
        f"| before joining (version {j['version_before']}) | "
        f"{f(j['joining_lab_referred_before'])} | {f(j['joining_lab_accuracy_before'])} "
        "| - | - |",
        f"| after {j['rounds_after_join']} rounds with it (version {j['version_after']}) | "
        f"{f(j['joining_lab_referred_after'])} | {f(j['joining_lab_accuracy_after'])} | "
        f"{f(j['other_labs_accuracy'])} ({others}) | {f(j['other_labs_referred'])} |", "",
        "Targets: the joining laboratory referred <= 0.05 after joining, its accuracy within "
        "2 points of the others'.", "",
        f"Probation margin (`join_probation_margin`): {j.get('join_probation_margin')}; "
        f"laboratories answered at the end: {j.get('established_at_end')}."
        + "".join(f" {m}." for m in j.get("probation_events", [])[-1:]), ""]


def calibration_lines(doc: dict[str, Any]) -> list[str]:
    """Each scenario's final version as a clinician gets it: calibrated, with 95% sets."""
    rows = [r for r in doc["scenarios"] if (r.get("final", {}).get("calibration") or {})
            .get("calibration_temperature") is not None]
    if not rows:
        return []

    lines = ["## Calibrated answers (final round)", "",
             "Temperature and 95% class-conditional conformal thresholds fitted from the "
             "hospitals' pooled validation sums (docs/calibration.md). *Coverage, hospitals*: "
             "on the hospitals' pooled test sums; *server*: on the server test split (the "
             "dataset's own acquisition, unseen by every simulated-laboratory hospital); "
             "*set refers*: sets that are not one class; *accuracy answered*: on the rest.",
             "",
             "| scenario | T | ECE val before -> after | ECE server before -> after "
             "| coverage: hospitals | server | set refers (server) | accuracy answered |",
             "|---" * 8 + "|"]
    for r in rows:
        c = r["final"]["calibration"]
        lines.append(
            f"| {r['scenario']} | {f(c['calibration_temperature'])} "
            f"| {f(c['val_ece_before'])} -> {f(c['val_ece_after'])} "
            f"| {f(c['server_test_ece_before'])} -> {f(c['server_test_ece_after'])} "
            f"| {f(c['test_conformal_coverage'])} | {f(c['server_test_conformal_coverage'])} "
            f"| {f(c['server_test_set_refer_share'])} "
            f"| {f(c['server_test_accuracy_answered'])} |")
    return lines + [""]


def robustness_lines(doc: dict[str, Any]) -> list[str]:
    """The final model of each scenario beside shortcuts, laboratories and "refer"."""
    rows = [r for r in doc["scenarios"] if r.get("final", {}).get("audit")]
    if not rows:
        return []
    kinds = ("grayscale", "magnified_2x", "magnified_0.5x", "blank_field", "natural_photo")

    lines = ["## What the accuracy means (final round)", "",
             "Audit columns as in `docs/benchmarks-central.md` (server test split recoloured to "
             "the hospitals' pooled class stains; colour-histogram forest cross-fitted on the "
             "server test split). *Hospitals*: each hospital's own test split under its own "
             "simulated laboratory (mean and worst); *unseen lab*: the server test split under "
             "a laboratory no hospital has; *training labs*: the same server test images "
             "under each hospital's laboratory (mean); *gap*: training labs' mean minus "
             "unseen lab, in points, on the same images (target within 5 with the default "
             "recipe), and in brackets hospitals' own-test mean minus unseen lab (their test "
             "splits differ in class mix too); *referred*: share sent to a "
             "hematologist (test: lower is better; probes: higher is better). In `labs` "
             "scenarios the server test split keeps the dataset's own acquisition, which "
             "after the simulation no hospital has: it is a second unseen laboratory, and "
             "*referred: test* is the share of it the refer check sends to a hematologist "
             "(66% with the refer rule of 2026-11-30; the rule since 2026-12-06 widens "
             "each statistic's range and tests magnification on its own: "
             "docs/benchmarks-refer.md).", "",
             "| scenario | px | test acc | recoloured | spatial | follow-colour "
             "| background-only | colour forest | hospitals mean / worst | training labs "
             "| unseen lab | gap (own tests) | referred: test | unseen lab | "
             + " | ".join(kinds) + " |",
             "|---" * (14 + len(kinds)) + "|"]
    for r in rows:
        fin, a = r["final"], r["final"]["audit"]
        accs = [v for v in fin.get("hospital_test_accuracy", {}).values() if v is not None]
        mean = float(np.mean(accs)) if accs else None
        unseen = fin.get("unseen_lab", {})
        own_gap = (100 * (mean - unseen["accuracy"])
                   if mean is not None and unseen.get("accuracy") is not None else None)
        labs = list(fin.get("training_labs", {}).values())
        labs_mean = float(np.mean(labs)) if labs else None
        gap = (100 * (labs_mean - unseen["accuracy"])
               if labs_mean is not None and unseen.get("accuracy") is not None else None)
        gaps = ("-" if gap is None else f"{gap:+.1f}") + (
            "" if own_gap is None else f" ({own_gap:+.1f})")
        ref = fin.get("referred", {})
        lines.append(
            f"| {r['scenario']} | {r.get('image_size', '')} "
            f"| {f(a.get('audit_original_accuracy'))} | {f(a.get('audit_recoloured_accuracy'))} "
            f"| {f(a.get('audit_spatial_accuracy'))} | {f(a.get('audit_follow_colour'))} "
            f"| {f(a.get('audit_background_only_accuracy'))} "
            f"| {f(a.get('audit_histogram_accuracy'))} "
            f"| {f(mean)} / {f(min(accs) if accs else None)} | {f(labs_mean)} "
            f"| {f(unseen.get('accuracy'))} | {gaps} | {f(ref.get('in_distribution_test'))} "
            f"| {f(unseen.get('referred'))} | " + " | ".join(f(ref.get(k)) for k in kinds)
            + " |")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "all-pbs"))
    p.add_argument("--model", default="compact_cnn")
    p.add_argument("--image-size", type=int, default=128,
                   help="the default recipe's size; scenarios flagged 'old' use 64")
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenarios", default="3:dirichlet:fedavg:labs,3:dirichlet:fedavg:labs:old",
                   help="comma-separated hospitals:scheme:strategy[:fp16][:fedbn][:gn][:dpZ]"
                   "[:nocal][:secure][:labs][:old][:param=value]; secure: secure "
                   "aggregation; labs: a simulated laboratory per "
                   "hospital and an unseen one for testing; old: the old recipe (64 px, basic "
                   "augmentation, whole field); gn: GroupNorm compact CNN; dpZ: central DP, noise "
                   "multiplier Z, adaptive clipping; epsE: example-level DP (DP-SGD at each "
                   "hospital, GroupNorm) with target epsilon E at delta 1e-5, each hospital "
                   "calibrating its noise to the rounds; nocal: no BatchNorm calibration; "
                   "param=value: a strategy parameter")
    p.add_argument("--central-from", default=None,
                   help="reuse the centralized reference of an earlier results JSON")
    p.add_argument("--same-images-central", action="store_true",
                   help="give each scenario its own centralized reference: the same passes "
                   "over the union of its hospitals' own training images (under their "
                   "laboratories), as bench_fed_ablation.py does; the gap is to it")
    p.add_argument("--append", action="store_true",
                   help="keep the scenarios already in --out and add (or rerun) these")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--virtual-above", type=int, default=5,
                   help="more hospitals than this are virtual hospitals in one process "
                        "(services/client/virtual.py); fewer get a worker process each")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "federated.json"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks-federated.md"))
    args = p.parse_args()
    split, ports = prepare_split(args.data, args.seed)
    doc = header()
    doc["config"] = {k: getattr(args, k) for k in ("model", "image_size", "rounds",
                                                   "local_epochs", "batch_size",
                                                   "learning_rate", "seed", "alpha")}
    if args.central_from:
        doc["centralized"] = json.loads(Path(args.central_from).read_text())["centralized"]
    else:
        print("== centralized reference", flush=True)
        doc["centralized"] = centralized(args, split)
    doc["results_json"] = str(Path(args.out).resolve().relative_to(ROOT))
    doc["curves_png"] = f"docs/img/{Path(args.out).stem}-curves.png"
    doc["scenarios"] = []
    if args.append:
        carry_earlier(doc, args.out)
    for spec in args.scenarios.split(","):
        parts = spec.split(":")
        s = {"hospitals": int(parts[0]), "scheme": parts[1], "strategy": parts[2],
             "labs": "labs" in parts[3:], "recipe": "old" if "old" in parts[3:] else "new",
             "fp16": "fp16" in parts[3:], "alpha": args.alpha if parts[1] != "iid" else 1.0,
             "bn_mode": "local" if "fedbn" in parts[3:] else "average",
             "norm": "group" if "gn" in parts[3:] else "batch",
             "bn_calibration": "off" if "nocal" in parts[3:] else "auto",
             "secure": "secure" in parts[3:]}
        s["params"] = {k: float(v) for k, v in (t.split("=", 1) for t in parts[3:] if "=" in t)}
        dp = [t for t in parts[3:] if t.startswith("dp")]
        eps = [t for t in parts[3:] if t.startswith("eps")]
        if eps:  # example level (issue 27): DP-SGD needs a model without BatchNorm
            s["privacy"] = {"level": "example", "target_epsilon": float(eps[0][3:]),
                            "delta": 1e-5}
            s["norm"] = "group"
        elif dp:
            s["privacy"] = {"mode": "central", "noise_multiplier": float(dp[0][2:]),
                            "adaptive_clipping": True}
        res = run_scenario(s, args, split, ports)
        if args.same_images_central:
            print(f"== centralized reference on {res['scenario']}'s own training images",
                  flush=True)
            res["central"] = same_images_central(args, s)
        res["summary"] = summarise(
            res, (res.get("central") or doc["centralized"])["test_accuracy"])
        res["summary"]["central_reference"] = (
            "same_images" if res.get("central") else "union_of_train_splits")
        doc["scenarios"] = [r for r in doc["scenarios"] if r["scenario"] != res["scenario"]]
        doc["scenarios"].append(res)
        write_json(args.out, doc)
    plot(doc, ROOT / doc["curves_png"])
    if privacy_rows(doc):  # client-level rows (example-level ones: privacy_table.py)
        doc["epsilon_png"] = f"docs/img/{Path(args.out).stem}-epsilon.png"
        plot_epsilon(doc, ROOT / doc["epsilon_png"])
        write_json(args.out, doc)
    Path(args.doc).write_text(markdown(doc))
    print(json.dumps([{r["scenario"]: r["summary"]} for r in doc["scenarios"]], indent=1))


if __name__ == "__main__":
    main()
