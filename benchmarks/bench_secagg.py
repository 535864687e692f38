"""Secure aggregation's cost and effect, side by side with plain FedAvg in one process.

Two parts, both with the compact CNN (``make bench-secagg``):

1. **Protocol cost at 3, 10 and 30 hospitals.** Every hospital runs its real side
   (``services.client.secure.SecureSessions``: key agreement, Shamir shares, masking) and the
   aggregator ``leukofed.secagg.unmask_sum``, in this one process, after the same small local
   step (a few training batches) per hospital. Per round: the time of the plain round (train
   + encode each hospital's update + average) and of the secure one (train + all four stages
   + unmask), and the bytes each hospital sends (plain fp32 and fp16 updates vs the secure
   keys, shares, masked vector and reveal, measured as msgpack bytes).
2. **Accuracy on the real data** with 3 non-IID hospitals (Dirichlet 0.5), plain FedAvg and
   the secure sum aggregating the same local updates every round (lockstep), so the
   difference is what the quantised, masked sum changes.

Writes benchmarks/results/secagg.json and docs/benchmarks-secagg.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from common import header, write_json  # noqa: E402

from leukofed import secagg  # noqa: E402
from leukofed.protocol import RoundConfig  # noqa: E402
from leukofed.wire import encode_weights  # noqa: E402
from services.aggregator.secure import auto_neighbours, update_ranges  # noqa: E402
from services.client.secure import SecureSessions  # noqa: E402


def _size(body: Any) -> int:
    return len(msgpack.packb(body, use_bin_type=True))


def secure_round(glob: dict[str, np.ndarray], deltas: dict[str, dict[str, np.ndarray]],
                 weights: dict[str, float], bn: frozenset[str], bits: int, server_round: int,
                 update_range: float = 1.0) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One secure sum over every hospital, in-process, exactly as the stages run it. Returns
    the mean delta and per-hospital bytes and seconds."""
    hospitals = sorted(deltas)
    k = auto_neighbours(len(hospitals))
    params = {"purpose": "fit", "bits": bits, "neighbours": k, "threshold_fraction": 0.6}
    base = {"run_id": "bench", "round": server_round}
    sessions = {h: SecureSessions(h) for h in hospitals}
    sent = {h: 0 for h in hospitals}
    t = {"keys": 0.0, "shares": 0.0, "masked": 0.0, "reveal": 0.0, "unmask": 0.0}
    start = time.perf_counter()
    # Each task's configuration as a hospital decodes it from the wire (RoundConfig).
    task = RoundConfig.decode
    keys = {h: sessions[h].keys(task({**base, "secure": params}), int(weights[h]))
            for h in hospitals}
    t["keys"] = time.perf_counter() - start
    for h in hospitals:
        sent[h] += _size({x: keys[h][x] for x in ("purpose", "c_pk", "s_pk", "cap")})
    # As services.aggregator.secure does: the graph of the session's public seed over the
    # members (the hospitals that sent keys), which every hospital recomputes and checks.
    session = secagg.Session(base["run_id"], server_round, params["purpose"], bits, k,
                             params["threshold_fraction"])
    graph = secagg.neighbour_graph(hospitals, k, secagg.graph_seed(session))
    start = time.perf_counter()
    shares = {h: sessions[h].shares(task({**base, "secure": {
        **params, "members": hospitals, "adverts": {p: keys[p] for p in (h, *graph[h])}}}))
        for h in hospitals}
    t["shares"] = time.perf_counter() - start
    for h in hospitals:
        sent[h] += _size({x: shares[h][x] for x in ("purpose", "ciphertexts", "threshold")})
    ranges = update_ranges(glob, bn, update_range)
    spec = secagg.VectorSpec(tuple(ranges), tuple(ranges.values()))
    total_weight = float(sum(int(weights[h]) for h in hospitals))
    received = secagg.relay({h: shares[h]["ciphertexts"] for h in hospitals})
    start = time.perf_counter()
    masked = {}
    for h in hospitals:
        cfg = task({**base, "secure": {**params, "received": received[h],
                                       "spec": spec.to_dict(), "cap": int(weights[h]),
                                       "total_weight": total_weight}})
        masked[h] = sessions[h].masked(cfg, glob, deltas[h], weights[h], {"count": 1.0})
        sent[h] += _size({x: masked[h][x] for x in ("purpose", "masked", "coords")})
    t["masked"] = time.perf_counter() - start
    start = time.perf_counter()
    reveals = {h: sessions[h].reveal(task({**base, "secure": {
        **params, "survivors": hospitals, "dropped": []}})) for h in hospitals}
    t["reveal"] = time.perf_counter() - start
    for h in hospitals:
        sent[h] += _size({"purpose": "fit", "reveals": reveals[h]["reveals"]})
    start = time.perf_counter()
    size = spec.size(glob)
    total = secagg.unmask_sum(
        session, {h: secagg.unpack(masked[h]["masked"], size, bits) for h in hospitals},
        {h: keys[h] for h in hospitals}, {h: sorted(received[h]) for h in hospitals},
        {h: reveals[h]["reveals"] for h in hospitals},
        {h: int(shares[h]["threshold"]) for h in hospitals})  # each hospital's own
    sums, extras = spec.split(secagg.dequantise(total, spec.coordinate_ranges(glob),
                                                total_weight, bits), glob)
    t["unmask"] = time.perf_counter() - start
    mean = {n: v / extras["count"] for n, v in sums.items()}
    return mean, {"bytes": sent, "seconds": t, "neighbours": k}


def plain_mean(deltas: dict[str, dict[str, np.ndarray]], weights: dict[str, float]
               ) -> dict[str, np.ndarray]:
    total = sum(weights.values())
    names = next(iter(deltas.values()))
    return {n: sum(weights[h] * deltas[h][n].astype(np.float64) for h in deltas) / total
            for n in names}


def _float_weights(model: Any) -> tuple[dict[str, np.ndarray], frozenset[str]]:
    from leukofed.wire import batchnorm_stat_names, weights_from_model

    w = weights_from_model(model)
    return ({n: v for n, v in w.items() if np.issubdtype(v.dtype, np.floating)},
            frozenset(batchnorm_stat_names(model)))


def protocol_cost(counts: list[int], image_size: int, bits: int, steps: int
                  ) -> list[dict[str, Any]]:
    """Part 1: plain vs secure round time and bytes per hospital, same local step."""
    import tensorflow as tf

    from leukofed.models import build_model
    from leukofed.train import Trainer, local_fit
    from leukofed.wire import set_model_weights, weights_from_model

    model = build_model("compact_cnn", image_size)
    trainer = Trainer(model)
    glob, bn = _float_weights(model)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (steps * 16, image_size, image_size, 3), dtype=np.uint8)
    y = rng.integers(0, 4, steps * 16).astype(np.int64)
    rows = []
    for n in counts:
        hospitals = [f"h{i:03d}" for i in range(n)]
        deltas, weights, train_s = {}, {}, {}
        for i, h in enumerate(hospitals):
            set_model_weights(model, glob)
            tf.keras.utils.set_random_seed(i)
            start = time.perf_counter()
            local_fit(trainer, x, y, batch_size=16, seed=i)
            train_s[h] = time.perf_counter() - start
            local = weights_from_model(model)
            deltas[h] = {k: local[k].astype(np.float64) - glob[k] for k in glob}
            weights[h] = float(100 + 10 * i)
        start = time.perf_counter()
        fp32 = {h: len(encode_weights({k: glob[k] + deltas[h][k].astype(np.float32)
                                       for k in glob})) for h in hospitals}
        fp16 = len(encode_weights({k: (glob[k] + deltas[hospitals[0]][k]).astype(np.float32)
                                   for k in glob}, fp16=True))
        mean_plain = plain_mean(deltas, weights)
        plain_extra = time.perf_counter() - start
        mean_secure, info = secure_round(glob, deltas, weights, bn, bits, 1)
        secure_extra = sum(info["seconds"].values())
        err = max(float(np.max(np.abs(mean_secure[k] - mean_plain[k]))) for k in glob)
        by_bits = {}
        for b in secagg.BITS:  # the width of the masked numbers: bytes against error
            mean_b, info_b = (mean_secure, info) if b == bits else secure_round(
                glob, deltas, weights, bn, b, 1)
            by_bits[str(b)] = {
                "max_abs_error_of_mean": max(float(np.max(np.abs(mean_b[k] - mean_plain[k])))
                                             for k in glob),
                "bytes_ratio_vs_fp16": float(np.mean(list(info_b["bytes"].values()))) / fp16}
        train_total = sum(train_s.values())
        per_hospital = float(np.mean(list(info["bytes"].values())))
        rows.append({
            "hospitals": n, "neighbours": info["neighbours"], "bits": bits,
            "coordinates": int(sum(v.size for v in glob.values())),
            "train_s_total": train_total,
            "plain_round_s": train_total + plain_extra,
            "secure_round_s": train_total + secure_extra,
            "secure_stage_s": info["seconds"],
            "round_time_ratio": (train_total + secure_extra) / (train_total + plain_extra),
            "plain_bytes_fp32": float(np.mean(list(fp32.values()))), "plain_bytes_fp16": fp16,
            "secure_bytes_per_hospital": per_hospital,
            "bytes_ratio_vs_fp16": per_hospital / fp16,
            "max_abs_error_of_mean": err, "by_bits": by_bits,
        })
        print(f"  {n:3d} hospitals: round {rows[-1]['plain_round_s']:.2f}s plain, "
              f"{rows[-1]['secure_round_s']:.2f}s secure ({rows[-1]['round_time_ratio']:.2f}x); "
              f"{per_hospital / 1e3:.0f} kB/hospital = {per_hospital / fp16:.2f}x fp16; "
              f"error {err:.1e}", flush=True)
    return rows


def accuracy(data: str, rounds: int, epochs: int, image_size: int, bits: int, seed: int
             ) -> dict[str, Any]:
    """Part 2: 3 non-IID hospitals on the real data. Each round the hospitals train once
    from the current global model, and the SAME updates are aggregated both ways, plain
    weighted mean and secure sum; both models are tested, and the run goes on from the
    secure one. Local training on this CPU is not reproducible between calls (augmentation
    draws), so two separate runs would differ by more than the aggregation does; lockstep
    isolates what the masked, quantised sum changes."""
    from leukofed.data import scan_dataset
    from leukofed.metrics import classification_metrics
    from leukofed.models import build_model
    from leukofed.partition import partition_records
    from leukofed.splits import group_split
    from leukofed.train import Trainer, load_arrays, local_fit
    from leukofed.wire import set_model_weights

    ds = scan_dataset(data)
    split = group_split(ds.records, seed=seed)
    parts = partition_records(split["train"], 3, "dirichlet", 0.5, seed)
    arrays = {h: load_arrays(r, image_size) for h, r in parts.items()}
    xt, yt = load_arrays(split["test"], image_size)
    model = build_model("compact_cnn", image_size)
    trainer = Trainer(model)
    glob, bn = _float_weights(model)
    curves: dict[str, list[float]] = {"plain": [], "secure": []}
    max_diff = []

    def test_accuracy(weights: dict[str, np.ndarray]) -> float:
        set_model_weights(model, weights)
        return float(classification_metrics(yt, trainer.predict(xt))["accuracy"])

    for r in range(1, rounds + 1):
        deltas, weights = {}, {}
        for i, (h, (x, y)) in enumerate(sorted(arrays.items())):
            set_model_weights(model, glob)
            local_fit(trainer, x, y, epochs=epochs, seed=seed * 1000 + r * 10 + i)
            local, _ = _float_weights(model)
            deltas[h] = {k: local[k].astype(np.float64) - glob[k] for k in glob}
            weights[h] = float(len(x))
        plain = plain_mean(deltas, weights)
        secure = secure_round(glob, deltas, weights, bn, bits, r)[0]
        max_diff.append(max(float(np.max(np.abs(plain[k] - secure[k]))) for k in glob))
        models = {arm: {k: (glob[k] + mean[k]).astype(glob[k].dtype) for k in glob}
                  for arm, mean in (("plain", plain), ("secure", secure))}
        for arm, w in models.items():
            curves[arm].append(test_accuracy(w))
        glob = models["secure"]
        print(f"  round {r:2d}: test accuracy plain {curves['plain'][-1]:.4f}, secure "
              f"{curves['secure'][-1]:.4f} (same updates; max weight difference "
              f"{max_diff[-1]:.1e})", flush=True)
    final = {arm: c[-1] for arm, c in curves.items()}
    return {"hospitals": 3, "alpha": 0.5, "rounds": rounds, "local_epochs": epochs,
            "image_size": image_size, "bits": bits, "curves": curves, "final": final,
            "max_weight_difference": max_diff,
            "difference_points": 100 * (final["secure"] - final["plain"]),
            "largest_round_difference_points": 100 * max(
                abs(a - b) for a, b in zip(curves["plain"], curves["secure"], strict=True)),
            "partition": {h: len(r) for h, r in parts.items()}}


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# Secure aggregation: cost and accuracy (`make bench-secagg`)", "",
             f"Measured {doc['date']} on {doc['machine']['cpu']} ({doc['machine']['cores']} "
             f"cores, no GPU), command `{doc['command']}`. Results: "
             "`benchmarks/results/secagg.json`. Both arms run in one process, side by side, "
             "so the ratios hold on a noisy machine.", "",
             "## Protocol cost (compact CNN, a small local step per hospital)", "",
             "Every hospital runs its real side of the protocol (X25519, Shamir shares, "
             "ChaCha20 masks) in this process, one after another, as a simulation does; "
             "Celery's per-stage latency is not included here: `make bench-secagg` then runs "
             "the real stack (broker, workers, aggregator, MLflow), 3 hospitals, 5 rounds "
             "with and without secure aggregation: "
             "[benchmarks-secagg-stack.md](benchmarks-secagg-stack.md).", "",
             "| hospitals | neighbours | plain round s | secure round s | ratio (target "
             "<= 1.5) | bytes/hospital | vs fp16 update (target <= 2 at 30) | max error of "
             "the mean |", "|---|---|---|---|---|---|---|---|"]
    for r in doc["protocol"]:
        lines.append(f"| {r['hospitals']} | {r['neighbours']} | {r['plain_round_s']:.2f} | "
                     f"{r['secure_round_s']:.2f} | {r['round_time_ratio']:.2f}x | "
                     f"{r['secure_bytes_per_hospital'] / 1e3:.0f} kB | "
                     f"{r['bytes_ratio_vs_fp16']:.2f}x | {r['max_abs_error_of_mean']:.1e} |")
    lines += ["", "### Width of the masked numbers (`secure_aggregation.bits`)", "",
              "Largest error of the aggregated mean update against the plain float64 mean "
              "(the typical coordinate of a mean update is ~1e-3 to 1e-2), and bytes per "
              "hospital against the fp16 plain update.", "",
              "| hospitals | " + " | ".join(f"{b}-bit error / bytes" for b in secagg.BITS)
              + " |", "|---" * (1 + len(secagg.BITS)) + "|"]
    for r in doc["protocol"]:
        lines.append(f"| {r['hospitals']} | " + " | ".join(
            f"{r['by_bits'][str(b)]['max_abs_error_of_mean']:.1e} / "
            f"{r['by_bits'][str(b)]['bytes_ratio_vs_fp16']:.2f}x" for b in secagg.BITS) + " |")
    acc = doc.get("accuracy")
    if acc:
        lines += ["", "## Accuracy on the real data (3 hospitals, Dirichlet 0.5)", "",
                  f"{acc['rounds']} rounds x {acc['local_epochs']} local epoch(s), "
                  f"{acc['image_size']} px, {acc['bits']}-bit secure sum. Every round the "
                  "same local updates are aggregated both ways and both models tested (local "
                  "training here is not reproducible between calls, so two separate runs "
                  "would differ by more than the aggregation does); the run continues from "
                  "the secure model.", "",
                  "| | final test accuracy |", "|---|---|",
                  f"| plain FedAvg (same updates) | {acc['final']['plain']:.4f} |",
                  f"| secure aggregation | {acc['final']['secure']:.4f} |",
                  f"| difference (target within 0.5 points) | "
                  f"{acc['difference_points']:+.2f} points (largest in any round "
                  f"{acc['largest_round_difference_points']:.2f}) |",
                  f"| largest weight difference between the two models | "
                  f"{max(acc['max_weight_difference']):.1e} |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "all-pbs"))
    p.add_argument("--hospitals", default="3,10,30")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--bits", type=int, default=secagg.DEFAULT_BITS)
    p.add_argument("--steps", type=int, default=2, help="local batches per hospital, part 1")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "secagg.json"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks-secagg.md"))
    args = p.parse_args()
    doc = header()
    print("== protocol cost", flush=True)
    doc["protocol"] = protocol_cost([int(n) for n in args.hospitals.split(",")],
                                    args.image_size, args.bits, args.steps)
    if not args.skip_accuracy and Path(args.data).is_dir():
        print("== accuracy, 3 non-IID hospitals", flush=True)
        doc["accuracy"] = accuracy(args.data, args.rounds, args.local_epochs, args.image_size,
                                   args.bits, args.seed)
    write_json(args.out, doc)
    Path(args.doc).write_text(markdown(doc))
    print(f"wrote {args.out} and {args.doc}")


if __name__ == "__main__":
    main()
