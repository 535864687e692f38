"""A laboratory joins a running federation, through the real stack (issue 24, item 3).

N hospitals, each its own simulated laboratory (Dirichlet label skew), train from round 1;
hospital N+1, whose laboratory lies outside the training range (leukofed.labs "outside"),
starts its worker once round ``--join-round`` - 1 is done and takes part from the next
round it is live for. The version of the round before it first took part and the final
version are read back from MLflow and judged on the aggregator's held-out test images
under the joining laboratory: the share the version's own acquisition check refers, and
the accuracy; beside the same images under each training laboratory. The result is the
``join`` section of ``benchmarks/results/federated.json`` (its scenarios stay as they are).

    .venv/bin/python benchmarks/bench_join.py            # 3 hospitals + 1, join at round 7
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_federated import (  # noqa: E402
    ROOT,
    Hooks,
    markdown,
    prepare_split,
    run_scenario,
    score_under_lab,
    sh,
)
from common import header, write_json  # noqa: E402

# The joining laboratory's draw: the in-process harness's (bench_fed_ablation.py --join).
JOINING_LAB_STREAM = 3


def judge(version: str, mlflow_url: str, split: Path, size: int,
          labs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Accuracy and referred share of ``version`` on the test split under each laboratory
    (acquisition files), the refer check being the version's own acquisition profile."""
    import mlflow

    from leukofed.ood import AcquisitionProfile
    from registry.model_versions import DEFAULT_MODEL_NAME, load_version

    mlflow.set_tracking_uri(mlflow_url)
    loaded = load_version(version, DEFAULT_MODEL_NAME)
    profile_dict = loaded.metadata.get("acquisition_profile")
    profile = AcquisitionProfile.from_dict(profile_dict) if profile_dict else None
    return {name: score_under_lab(loaded.model, profile, split, size, lab_file)
            for name, lab_file in labs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "all-pbs"))
    p.add_argument("--hospitals", type=int, default=3, help="hospitals from round 1")
    p.add_argument("--join-round", type=int, default=7)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--model", default="compact_cnn")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--virtual-above", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "federated.json"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks-federated.md"))
    p.add_argument("--probation-margin", default="0.05",
                   help="the run's join_probation_margin; 'none': every participant's "
                        "laboratory answered from the round it joins (before 2026-12-08)")
    args = p.parse_args()
    from leukofed.labs import ACQUISITION_FILE, draw_acquisition, write_acquisition
    from leukofed.partition import hospital_ids

    split, ports = prepare_split(args.data, args.seed)
    ids = hospital_ids(args.hospitals + 1)
    joiner = ids[-1]
    lab = draw_acquisition(np.random.default_rng([args.seed, JOINING_LAB_STREAM]), "outside",
                           name="joining")
    labs: dict[str, Path] = {}
    judged: dict[str, Any] = {}
    state: dict[str, Any] = {"started_at": None, "record": {}}
    margin = None if args.probation_margin == "none" else float(args.probation_margin)

    def prepare(hospitals: Path) -> None:  # the joiner's laboratory: outside the range
        write_acquisition(hospitals / joiner / ACQUISITION_FILE, lab)
        labs.update({h: hospitals / h / ACQUISITION_FILE for h in ids})

    def on_round(rnd: int, rec: dict[str, Any], env: dict[str, str]) -> None:
        mlflow_url = f"http://127.0.0.1:{ports['mlflow']}"
        state["record"] = rec
        joined = any(joiner in r["hospitals"] for r in rec["history"] if r["round"] <= rnd)
        # The version the joining laboratory would be served just before it joins (judged
        # from the round before its worker starts until it first takes part).
        if not joined and rnd >= args.join_round - 1:
            judged["before"] = {"round": rnd, "version": rec["versions"][str(rnd)],
                                **judge(rec["versions"][str(rnd)], mlflow_url, split,
                                        args.image_size, labs)}
        if rnd == args.join_round - 1 and state["started_at"] is None:
            print(f"  starting hospital {joiner}'s worker (laboratory outside the range)",
                  flush=True)
            sh("scripts/stack.sh", "up", env={**env, "HOSPITAL_IDS": joiner})
            state["started_at"] = rnd
        if rnd == args.rounds:
            judged["after"] = {"round": rnd, "version": rec["versions"][str(rnd)],
                               **judge(rec["versions"][str(rnd)], mlflow_url, split,
                                       args.image_size, labs)}

    s = {"hospitals": args.hospitals + 1, "scheme": "dirichlet", "strategy": "fedavg",
         "labs": True, "recipe": "new", "fp16": False, "alpha": args.alpha,
         "bn_mode": "average", "norm": "batch", "bn_calibration": "auto", "secure": False,
         "params": {}}
    args.scenarios = None
    res = run_scenario(s, args, split, ports, Hooks(
        prepare=prepare, first_ids=ids[:-1], min_fit=args.hospitals, on_round=on_round,
        config={"join_probation_margin": margin}))
    record = state["record"]
    first = next((r["round"] for r in res["rounds"] if joiner in r["participants"]), None)
    before, after = judged.get("before", {}), judged["after"]
    others = {h: after[h]["accuracy"] for h in ids[:-1]}
    join = {
        "command": header()["command"], "date": header()["date"],
        "hospitals": args.hospitals, "joining_hospital": joiner, "joining_lab": lab.to_dict(),
        "worker_started_after_round": state["started_at"], "first_round_with_joiner": first,
        "rounds": args.rounds, "join_probation_margin": margin,
        "rounds_after_join": args.rounds - first + 1 if first else 0,
        # whose laboratory the final version answers, and why the joiner's is not (if so)
        "established_at_end": record.get("established_hospitals"),
        "probation_events": [e["message"] for e in record.get("events", [])
                             if "probation" in e.get("message", "")][-3:],
        "version_before": before.get("version"), "version_after": after["version"],
        "joining_lab_referred_before": before.get(joiner, {}).get("referred"),
        "joining_lab_accuracy_before": before.get(joiner, {}).get("accuracy"),
        "joining_lab_referred_after": after[joiner]["referred"],
        "joining_lab_accuracy_after": after[joiner]["accuracy"],
        "other_labs": others,
        "other_labs_accuracy": float(np.mean(list(others.values()))),
        "other_labs_referred": float(np.mean([after[h]["referred"] for h in ids[:-1]])),
        "test_accuracy": res["rounds"][-1]["test_accuracy"],
        "participants_by_round": {r["round"]: r["participants"] for r in res["rounds"]},
        "audit": res["final"].get("audit"), "referred": res["final"].get("referred"),
        "partition_table": res["partition_table"], "run_id": res["run_id"],
        "wall_s": res["wall_s"],
        "targets": {"joining_lab_referred_after_at_most": 0.05,
                    "accuracy_within_points_of_others": 2.0},
    }
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {**header(), "scenarios": []}
    # The default (a joining laboratory on probation) is the "join" section; the
    # same scenario without probation is kept beside it for comparison.
    doc["join" if margin is not None else "join_without_probation"] = join
    write_json(out, doc)
    if doc.get("scenarios"):
        Path(args.doc).write_text(markdown(doc))
    print(json.dumps({k: v for k, v in join.items() if k not in (
        "joining_lab", "audit", "partition_table", "participants_by_round")}, indent=1))


if __name__ == "__main__":
    main()
