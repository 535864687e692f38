"""Ratios between two services' bench_inference runs made back to back (inference_ab.sh).

Reads DIR/base-<i>.json and DIR/head-<i>.json, pairs them by i, and reports for every
serving mode and client count the ratio head / base of images/s and of p50 latency, the
geometric mean of the ratios per pair, and the same ratio between the base's own runs:
the machine's drift, the yardstick a difference has to clear.

    .venv/bin/python benchmarks/compare_inference.py DIR --base-rev R1 --head-rev R2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, write_json  # noqa: E402

Cells = dict[tuple[str, int], dict[str, float]]


def cells(run_file: Path) -> Cells:
    run = json.loads(run_file.read_text())["runs"][0]
    out = {(r["mode"], r["concurrency"]): {"images_per_s": r["throughput_img_s"],
                                           "p50_ms": r["p50_ms"]} for r in run["predict"]}
    out[("onnxruntime in-process, batch 1", 1)] = {
        "images_per_s": run["runtime"]["onnxruntime_b1"], "p50_ms": math.nan}
    return out


def geomean(values: list[float]) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


def ratios(head: Cells, base: Cells) -> dict[str, Any]:
    rows = []
    for key in base:
        if key in head:
            rows.append({"mode": key[0], "clients": key[1],
                         "images_per_s": head[key]["images_per_s"] / base[key]["images_per_s"],
                         "p50_ms": head[key]["p50_ms"] / base[key]["p50_ms"]})
    return {"rows": rows,
            "geomean_images_per_s": geomean([r["images_per_s"] for r in rows]),
            "geomean_p50_ms": geomean([r["p50_ms"] for r in rows])}


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Inference service, two commits side by side",
        "",
        f"- command: `{doc['command']}`",
        f"- machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores; "
        f"date: {doc['date']}",
        f"- base: `{doc['base_rev']}`; head: `{doc['head_rev']}`; model: "
        f"{doc['model']}"
        ", each side building, registering and serving it its own way; runs alternated "
        "base, head, base, head",
        "- ratio > 1 for images/s and < 1 for p50 favour the head. *Base vs base* is the "
        "same code measured twice: the machine's drift, which a difference must clear.",
        "",
        "| comparison | images/s, geometric mean of ratios | p50, geometric mean of ratios |",
        "|---|---|---|",
    ]
    for name, r in doc["comparisons"].items():
        lines.append(f"| {name} | {r['geomean_images_per_s']:.2f} | {r['geomean_p50_ms']:.2f} |")
    first = next(iter(doc["comparisons"].values()))
    lines += ["", "Per cell, head / base of the first pair:", "",
              "| serving | clients | images/s | p50 |", "|---|---|---|---|"]
    for r in first["rows"]:
        p50 = "" if math.isnan(r["p50_ms"]) else f"{r['p50_ms']:.2f}"
        lines.append(f"| {r['mode']} | {r['clients']} | {r['images_per_s']:.2f} | {p50} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--base-rev", required=True)
    p.add_argument("--head-rev", required=True)
    p.add_argument("--model", default="compact CNN @64 px, untrained, without the rotation "
                   "ensemble", help="what both sides served, for the table's header")
    p.add_argument("--command", help="the command that made the runs (default: "
                   "benchmarks/inference_ab.sh BASE)")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--markdown", type=Path, required=True)
    args = p.parse_args()
    pairs = sorted(int(f.stem.split("-")[1]) for f in args.dir.glob("base-*.json")
                   if (args.dir / f"head-{f.stem.split('-')[1]}.json").exists())
    if not pairs:
        sys.exit(f"no base-<i>.json / head-<i>.json pairs in {args.dir}")
    base = {i: cells(args.dir / f"base-{i}.json") for i in pairs}
    head = {i: cells(args.dir / f"head-{i}.json") for i in pairs}
    doc = header()
    doc.update(command=args.command or "benchmarks/inference_ab.sh " + args.base_rev,
               base_rev=args.base_rev, head_rev=args.head_rev, model=args.model,
               comparisons={})
    for i in pairs:
        doc["comparisons"][f"pair {i}: head / base"] = ratios(head[i], base[i])
    if len(pairs) > 1:
        doc["comparisons"]["base run 2 / base run 1 (drift)"] = ratios(base[pairs[1]],
                                                                       base[pairs[0]])
        doc["comparisons"]["head run 2 / head run 1 (drift)"] = ratios(head[pairs[1]],
                                                                       head[pairs[0]])
    write_json(args.json, doc)
    args.markdown.write_text(markdown(doc))
    for name, r in doc["comparisons"].items():
        print(f"{name}: images/s x{r['geomean_images_per_s']:.2f}, "
              f"p50 x{r['geomean_p50_ms']:.2f}")
    print(f"wrote {args.json} and {args.markdown}")


if __name__ == "__main__":
    main()
