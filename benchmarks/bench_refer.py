"""The "refer" rule on many block splits: does a bound chosen once carry to the next split?

The acquisition profile (leukofed.ood) depends on the training images only, not on a model,
so its referral shares can be measured on many draws of the block split in minutes. For each
split seed: the profile of the training images at the default input size, then the share
of validation and test images referred (target <= 0.05) and of each out-of-distribution
probe made from test images (target >= 0.95), under the current rule and under the rule it
replaced (training range with no margin, Mahalanobis bound 5, no scale test), side by side.
The current bounds were chosen on seeds 0-5; seeds 6-9 were drawn after and confirm them.
Writes benchmarks/results/refer-splits.json and docs/benchmarks-refer.md.

    make bench-refer        # or: .venv/bin/python benchmarks/bench_refer.py --data DIR
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REFERRAL_KINDS as PROBES  # noqa: E402
from common import header, referral_shares_by_rule, referred_share, write_json  # noqa: E402

from leukofed.data import scan_dataset  # noqa: E402
from leukofed.ood import AcquisitionProfile, ProfileStats, descriptors  # noqa: E402
from leukofed.protocol import DEFAULT_IMAGE_SIZE  # noqa: E402
from leukofed.splits import group_split  # noqa: E402
from leukofed.train import load_arrays  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The rule before the scale test (session 9): bound 5 chosen on one split's validation.
PREVIOUS_RULE = {"range_margin": 0.0, "max_distance": 5.0, "max_scale_shift": math.inf}


def measure_split(records: list, seed: int, size: int) -> dict[str, Any]:
    split = group_split(records, seed=seed)
    train, val, test = (load_arrays(split[n], size)[0] for n in ("train", "val", "test"))
    stats = ProfileStats.of_images(train)
    out: dict[str, Any] = {"seed": seed, "counts": [len(train), len(val), len(test)]}
    profiles = {"current": AcquisitionProfile.from_stats(stats),
                "previous": AcquisitionProfile.from_stats(stats, **PREVIOUS_RULE)}
    out.update(referral_shares_by_rule(profiles, test, seed))
    val_descriptors = descriptors(val)
    for rule, profile in profiles.items():
        out[rule]["val"] = referred_share(profile, described=val_descriptors)
    cur, prev = out["current"], out["previous"]
    print(f"seed {seed}: referred test {cur['in_distribution_test']:.3f} (previous rule "
          f"{prev['in_distribution_test']:.3f}), lowest probe "
          f"{min(cur[k] for k in PROBES):.3f} ({min(prev[k] for k in PROBES):.3f})", flush=True)
    return out


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    head = ["val", "in_distribution_test", *PROBES]
    lines = ["# The \"refer\" rule across block splits", "",
             f"Command: `{doc['command']}`  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB  ",
             f"Date: {doc['date']}; {doc['image_size']} px; results: "
             "`benchmarks/results/refer-splits.json`.", "",
             "Share of images the acquisition profile (leukofed.ood) refers to a hematologist, "
             "on each draw of the block split. *val*, *test*: in-distribution held-out images "
             "(target <= 0.05); every other column: out-of-distribution probes made from the "
             "test images (target >= 0.95). *current*: range widened by 10%, Mahalanobis "
             "bound 6, scale test bound 2.75 (chosen on seeds 0-5; seeds 6-9 confirm); "
             "*previous*: range with no margin, Mahalanobis bound 5 (chosen on seed 0's "
             "validation alone), no scale test. No model is involved: the rule sees only "
             "the images.", "",
             "| seed | rule | val | test | " + " | ".join(PROBES) + " |",
             "|---" * (2 + len(head)) + "|"]
    for r in doc["splits"]:
        for rule in ("current", "previous"):
            lines.append(f"| {r['seed']} | {rule} | "
                         + " | ".join(f"{r[rule][k]:.3f}" for k in head) + " |")
    for rule in ("current", "previous"):
        arr = np.array([[r[rule][k] for k in head] for r in doc["splits"]])
        worst = np.where([k in ("val", "in_distribution_test") for k in head], arr.max(0),
                         arr.min(0))
        lines.append(f"| mean | {rule} | " + " | ".join(f"{v:.3f}" for v in arr.mean(0)) + " |")
        lines.append(f"| worst | {rule} | " + " | ".join(f"{v:.3f}" for v in worst) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "all-pbs"))
    p.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "refer-splits.json"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks-refer.md"))
    args = p.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"data folder not found: {args.data}")
    records = scan_dataset(args.data).records
    doc = {**header(), "image_size": args.image_size, "splits": []}
    for seed in (int(s) for s in args.seeds.split(",")):
        doc["splits"].append(measure_split(records, seed, args.image_size))
        write_json(args.out, doc)
    Path(args.doc).write_text(markdown(doc))
    print(f"wrote {args.out} and {args.doc}")


if __name__ == "__main__":
    main()
