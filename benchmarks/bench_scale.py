"""Many hospitals on one machine: what the orchestration costs at 10, 50 and 200 hospitals.

For each hospital count, a fresh stack of real processes: redis-server, the aggregator
under uvicorn (MLflow off: this measures the round loop, not the registry), and virtual
hospitals (services/client/virtual.py) in ``--workers`` processes. Each hospital holds a
few synthetic images (the compact model, 32 px, one local epoch of one batch: a small
local step), and a FedAvg run of ``--rounds`` rounds asks every hospital every round.

Per hospital count it records, per round and at the median over rounds:

* ``round_s``: the round's wall time (fit, federated evaluation, checkpoint);
* ``train_busy_s``: the time the hospitals spent inside their fit tasks, summed: one worker
  process trains its hospitals one after another, so this is the critical path of the fit
  step (with W processes, the largest per-process sum);
* ``overhead_s`` = fit wall time - ``train_busy_s``: everything that is not a hospital
  training: sending tasks, Celery and Redis, reading, checking and folding updates. (For
  real hospitals training in parallel the aggregator reports fit wall - slowest hospital;
  with virtual hospitals in series, that would count the others' training as overhead);
* peak memory (VmHWM) of the aggregator process, and Redis's peak ``used_memory`` above
  its idle level, beside the in-flight cap (max_in_flight x update size);
* bytes through Redis per round (network in + out of redis-server).

Writes benchmarks/results/scale.json, docs/benchmarks-scale.md and docs/img/scale.png.

    make bench-scale        # or: .venv/bin/python benchmarks/bench_scale.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv" / "bin"
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} not open after {timeout}s")


def wait_log(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{text!r} not in {path} after {timeout}s")


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def env_for(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEUKOFED_")}
    env.update(LEUKOFED_DEV_MODE="1", PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3",
               CUDA_VISIBLE_DEVICES="", LEUKOFED_LOG_FORMAT="text", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Stack:
    """redis-server, the aggregator and the virtual workers of one measurement."""

    def __init__(self, work: Path, ids: list[str], workers: int, max_in_flight: int,
                 shares: list[list[str]] | None = None) -> None:
        self.work, self.ids = work, ids
        self.shares = shares or [ids[i::workers] for i in range(workers)]
        workers = len(self.shares)
        self.redis_port, self.api_port = free_port(), free_port()
        self.broker = f"redis://127.0.0.1:{self.redis_port}/0"
        self.procs: dict[str, subprocess.Popen] = {}
        self.workers, self.max_in_flight = workers, max_in_flight

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.work / f"{name}.log").open("w")
        self.procs[name] = subprocess.Popen(argv, cwd=ROOT, env=env_for(env or {}),
                                            stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def up(self) -> None:
        (self.work / "redis").mkdir(parents=True)
        self.spawn("redis", ["redis-server", "--port", str(self.redis_port), "--bind",
                             "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(self.work / "redis")])
        wait_port(self.redis_port, 20)
        self.spawn("aggregator", [str(VENV / "uvicorn"), "services.aggregator.app:create_app",
                                  "--factory", "--host", "127.0.0.1", "--port",
                                  str(self.api_port)],
                   {"LEUKOFED_AGGREGATOR_BROKER_URL": self.broker,
                    "LEUKOFED_AGGREGATOR_STATE_DIR": str(self.work / "aggregator"),
                    "LEUKOFED_AGGREGATOR_CACHE_DIR": str(self.work / "cache"),
                    "LEUKOFED_AGGREGATOR_TRACKING": "false",
                    "LEUKOFED_AGGREGATOR_MAX_IN_FLIGHT": str(self.max_in_flight),
                    "LEUKOFED_AGGREGATOR_PING_TIMEOUT_S": "2"})
        for i, share in enumerate(self.shares):
            self.spawn(f"virtual-{i}", [str(VENV / "leukofed"), "client", "virtual"],
                       {"LEUKOFED_VIRTUAL_HOSPITALS_DIR": str(self.work / "hospitals"),
                        "LEUKOFED_VIRTUAL_HOSPITALS": ",".join(share),
                        "LEUKOFED_VIRTUAL_BROKER_URL": self.broker,
                        "LEUKOFED_VIRTUAL_STATE_DIR": str(self.work / "state"),
                        "LEUKOFED_VIRTUAL_CACHE_DIR": str(self.work / "cache"),
                        "LEUKOFED_VIRTUAL_BLOCK_SIZE": "2",
                        "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"})
        wait_port(self.api_port, 120)
        for i in range(self.workers):
            wait_log(self.work / f"virtual-{i}.log", "ready.", 240)

    def redis_info(self) -> dict[str, str]:
        out = subprocess.run(["redis-cli", "-p", str(self.redis_port), "info"],
                             capture_output=True, text=True, check=True).stdout
        return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)

    def down(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)


class Sampler(threading.Thread):
    """Polls Redis's used_memory (its own peak counter cannot be reset between phases)."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(daemon=True)
        self.stack, self.peak, self.stopped = stack, 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            with contextlib.suppress(Exception):  # redis going down at the end
                self.peak = max(self.peak, int(self.stack.redis_info()["used_memory"]))
            self.stopped.wait(0.2)


def fit_spans(log: Path) -> dict[int, float]:
    """Per round, the virtual worker's span over its fit tasks: first 'received' to last
    'succeeded' in its log (Celery's own lines). Inside it the worker is busy with training
    and Celery's per-task work (fetch, ack, store the result); outside it the fit step
    waits on the aggregator and Redis."""
    import datetime as dt
    import re

    def stamp(line: str) -> float:
        return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()

    received: dict[str, float] = {}
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = re.search(r"Task leukofed\.client\.fit\[([0-9a-f-]+)\] (received|succeeded)", line)
        if not m:
            continue
        if m.group(2) == "received":
            received[m.group(1)] = stamp(line)
            continue
        rnd = re.search(r"'round': (\d+)", line)
        if rnd is None or m.group(1) not in received:
            continue
        r = int(rnd.group(1))
        first[r] = min(first.get(r, math.inf), received[m.group(1)])
        last[r] = max(last.get(r, 0.0), stamp(line))
    return {r: last[r] - first[r] for r in first}


def hospitals(name: str, n: int, per_class: int) -> tuple[Path, list[str]]:
    """A fresh work folder with ``n`` hospitals of synthetic images (32 px)."""
    from leukofed.synthetic import write_synthetic_dataset

    work = ROOT / ".run" / "bench-scale" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ids = [f"h{i:03d}" for i in range(n)]
    for i, h in enumerate(ids):
        write_synthetic_dataset(work / "hospitals" / h, per_class=per_class,
                                seed_offset=10_000 * (i + 1), size=32)
    return work, ids


def measure(n: int, args: argparse.Namespace) -> dict[str, Any]:
    work, ids = hospitals(str(n), n, args.per_class)
    stack = Stack(work, ids, args.workers, args.max_in_flight)
    print(f"\n== {n} hospitals ({args.workers} virtual worker process(es))", flush=True)
    try:
        stack.up()
        idle = int(stack.redis_info()["used_memory"])
        before = stack.redis_info()
        sampler = Sampler(stack)
        sampler.start()
        api = f"http://127.0.0.1:{stack.api_port}"
        config = {"name": f"bench-scale {n}", "model": "compact_cnn", "image_size": 32,
                  "local_epochs": 1, "batch_size": 16, "learning_rate": 1e-3,
                  "jit_compile": False, "seed": 1, "rounds": args.rounds, "hospitals": ids,
                  "min_fit_clients": n, "round_deadline_s": 3600, "strategy": "fedavg",
                  "register_models": False, "max_round_retries": 0}
        response = httpx.post(f"{api}/v1/runs", json=config, timeout=60)
        response.raise_for_status()
        run_id = response.json()["id"]
        started, seen = time.monotonic(), 0
        while True:
            rec = httpx.get(f"{api}/v1/runs/{run_id}", timeout=60).json()
            for r in rec["history"][seen:]:
                t = r["timings"]
                print(f"  round {r['round']}: {t['round_s']:.1f} s (fit {t['fit_wall_s']:.1f}"
                      f" s, evaluate {t['eval_s']:.1f} s)", flush=True)
            seen = len(rec["history"])
            if rec["status"] in ("completed", "failed", "cancelled"):
                break
            progress = rec.get("progress") or {}
            if progress:
                print(f"    {progress.get('task')} {progress.get('answered')}/"
                      f"{progress.get('selected')}", end="\r", flush=True)
            time.sleep(2)
        wall = time.monotonic() - started
        sampler.stopped.set()
        sampler.join()
        after = stack.redis_info()
        aggregator_hwm = status_kib(stack.procs["aggregator"].pid, "VmHWM")
        worker_hwm = max(status_kib(stack.procs[f"virtual-{i}"].pid, "VmHWM")
                         for i in range(args.workers))
    finally:
        stack.down()
    if rec["status"] != "completed":
        raise RuntimeError(f"{n} hospitals: run {rec['status']}: {rec.get('reason')}")
    spans = [fit_spans(work / f"virtual-{i}.log") for i in range(args.workers)]
    rounds = []
    for r in rec["history"]:
        t = r["timings"]
        per_worker = [sum(r["hospitals"][h].get("total_s", 0.0) for h in ids[i::args.workers]
                          if h in r["hospitals"]) for i in range(args.workers)]
        busy = max(per_worker)
        span = max(sp.get(r["round"], 0.0) for sp in spans)
        rounds.append({"round": r["round"], "round_s": t["round_s"],
                       "fit_wall_s": t["fit_wall_s"], "eval_s": t["eval_s"],
                       "train_busy_s": busy, "overhead_s": max(0.0, t["fit_wall_s"] - busy),
                       "worker_span_s": span,
                       "worker_task_overhead_s": max(0.0, span - busy),
                       "aggregator_overhead_s": max(0.0, t["fit_wall_s"] - span),
                       "participants": len(r["participants"])})
    update_bytes = statistics.median(b for r in rec["history"] for b in r["bytes"].values())
    net = sum(int(after[k]) - int(before[k])
              for k in ("total_net_input_bytes", "total_net_output_bytes"))
    cap = min(n, args.max_in_flight) * update_bytes
    med = {k: statistics.median(r[k] for r in rounds)
           for k in ("round_s", "fit_wall_s", "eval_s", "train_busy_s", "overhead_s",
                     "worker_task_overhead_s", "aggregator_overhead_s")}
    row = {"hospitals": n, "workers": args.workers, "rounds": rounds, "wall_s": wall, **med,
           "overhead_per_hospital_ms": 1000 * med["overhead_s"] / n,
           "aggregator_peak_mib": aggregator_hwm / 1024,
           "worker_peak_mib": worker_hwm / 1024,
           "redis_idle_mib": idle / 2**20,
           "redis_peak_above_idle_mib": max(0, sampler.peak - idle) / 2**20,
           "update_bytes": update_bytes, "in_flight_cap_mib": cap / 2**20,
           "redis_bytes_per_round": net / args.rounds}
    print(f"  median round {med['round_s']:.1f} s, overhead {med['overhead_s']:.2f} s, "
          f"aggregator peak {row['aggregator_peak_mib']:.0f} MiB, redis peak +"
          f"{row['redis_peak_above_idle_mib']:.1f} MiB (cap {row['in_flight_cap_mib']:.1f} "
          f"MiB), {net / args.rounds / 2**20:.1f} MiB through Redis per round", flush=True)
    return row


def liveness(n: int, dead: int, args: argparse.Namespace) -> dict[str, Any]:
    """One round with ``n`` hospitals selected, of which ``dead`` are served by a second
    virtual-worker process that is killed (SIGKILL) when it takes its first fit task. The
    round must end with the others, long before its deadline."""
    work, ids = hospitals(f"liveness-{n}-{dead}", n, args.per_class)
    stack = Stack(work, ids, 2, args.max_in_flight, shares=[ids[:-dead], ids[-dead:]])
    deadline_s = 900.0
    print(f"\n== liveness: {n} hospitals, {dead} killed mid-round", flush=True)
    try:
        stack.up()
        api = f"http://127.0.0.1:{stack.api_port}"
        config = {"name": f"bench-scale liveness {n}/{dead}", "model": "compact_cnn",
                  "image_size": 32, "local_epochs": 1, "batch_size": 16, "seed": 1,
                  "jit_compile": False, "rounds": 1, "hospitals": ids,
                  "min_fit_clients": n - dead, "round_deadline_s": deadline_s,
                  "strategy": "fedavg", "register_models": False, "max_round_retries": 0}
        response = httpx.post(f"{api}/v1/runs", json=config, timeout=60)
        response.raise_for_status()
        run_id = response.json()["id"]
        wait_log(work / "virtual-1.log", "Task leukofed.client.fit[", deadline_s)
        doomed = stack.procs["virtual-1"]
        os.killpg(doomed.pid, signal.SIGKILL)
        killed = time.monotonic()
        while True:
            rec = httpx.get(f"{api}/v1/runs/{run_id}", timeout=60).json()
            if rec["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(1)
        after_kill = time.monotonic() - killed
    finally:
        stack.down()
    if rec["status"] != "completed":
        raise RuntimeError(f"liveness: run {rec['status']}: {rec.get('reason')}")
    r = rec["history"][0]
    lost = [h for h, why in r["failed"].items() if why.startswith("worker lost")]
    row = {"hospitals": n, "killed": dead, "participants": len(r["participants"]),
           "failed_worker_lost": len(lost), "round_s": r["timings"]["round_s"],
           "deadline_s": deadline_s, "run_end_after_kill_s": after_kill}
    print(f"  {row}", flush=True)
    return row


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_n = {r["hospitals"]: r for r in rows}
    out: dict[str, Any] = {}
    if 200 in by_n:
        out["overhead_under_2s_at_200"] = by_n[200]["overhead_s"] < 2.0
        # What a federation of 200 real hospitals training in parallel would see: the
        # aggregator's and Redis's part, plus one task's Celery work (paid in parallel).
        per_task = by_n[200]["worker_task_overhead_s"] / 200
        out["parallel_estimate_s_at_200"] = by_n[200]["aggregator_overhead_s"] + per_task
        out["aggregator_overhead_under_2s_at_200"] = by_n[200]["aggregator_overhead_s"] < 2.0
    if 200 in by_n and 10 in by_n:
        ratio = by_n[200]["aggregator_peak_mib"] / by_n[10]["aggregator_peak_mib"]
        out["aggregator_peak_ratio_200_vs_10"] = ratio
        out["aggregator_peak_within_1_2x"] = ratio <= 1.2
    out["redis_peak_under_2x_cap"] = all(
        r["redis_peak_above_idle_mib"] < 2 * r["in_flight_cap_mib"] for r in rows)
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["hospitals"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [("seconds per round", [("round_s", "round"), ("train_busy_s", "hospitals "
                                      "training (in series)"), ("overhead_s", "overhead"),
                                     ("aggregator_overhead_s", "of which aggregator + Redis")]),
              ("peak memory (MiB)", [("aggregator_peak_mib", "aggregator"),
                                     ("worker_peak_mib", "virtual worker")]),
              ("Redis memory (MiB)", [("redis_peak_above_idle_mib", "peak above idle"),
                                      ("in_flight_cap_mib", "in-flight cap")]),
              ("MiB through Redis per round", [("redis_bytes_per_round", "in + out")])]
    for ax, (title, series) in zip(axes, panels, strict=True):
        for key, label in series:
            values = [r[key] / (2**20 if key == "redis_bytes_per_round" else 1) for r in rows]
            ax.plot(n, values, marker="o", label=label)
        ax.set_xscale("log")
        if key.endswith("_s") and title.startswith("seconds"):
            ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xticks(n, [str(v) for v in n])
        ax.set_xlabel("hospitals")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        "# Benchmark: many hospitals on one machine", "",
        f"Measured {doc['date']} on {m['cpu']} ({m['cores']} cores, {m['memory_gib']} GiB), "
        f"command `{doc['command']}`. Raw numbers: `benchmarks/results/scale.json`. "
        "Method: `benchmarks/bench_scale.py` docstring; a fresh redis-server, aggregator "
        f"and {doc['args']['workers']} virtual-hospital worker process(es) per row; "
        f"FedAvg, compact model at 32 px, {doc['args']['per_class']} synthetic images per "
        f"class and hospital, {doc['args']['rounds']} rounds, every hospital every round, "
        f"max_in_flight {doc['args']['max_in_flight']}; medians over rounds.", "",
        "| hospitals | round s | hospitals training s (in series) | overhead s | of which: "
        "worker's per-task Celery work s | of which: aggregator and Redis s | overhead per "
        "hospital ms | aggregator peak MiB | worker peak MiB | Redis peak above idle MiB "
        "| in-flight cap MiB | MiB through Redis per round |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        lines.append(
            f"| {r['hospitals']} | {r['round_s']:.1f} | {r['train_busy_s']:.1f} | "
            f"{r['overhead_s']:.2f} | {r['worker_task_overhead_s']:.2f} | "
            f"{r['aggregator_overhead_s']:.2f} | {r['overhead_per_hospital_ms']:.1f} | "
            f"{r['aggregator_peak_mib']:.0f} | {r['worker_peak_mib']:.0f} | "
            f"{r['redis_peak_above_idle_mib']:.1f} | {r['in_flight_cap_mib']:.1f} | "
            f"{r['redis_bytes_per_round'] / 2**20:.1f} |")
    t = doc["targets"]
    lines += ["", "*Overhead* is the fit step's wall time minus the time the hospitals spent "
              "inside their fit tasks. It splits into the *worker's per-task Celery work* "
              "(taking the message, storing the result, acknowledging: inside the worker's "
              "span of fit tasks, outside the tasks' own timings; virtual hospitals pay it "
              "in series, N times a round) and *the aggregator and Redis* (the fit step's "
              "wall time outside that span: sending, the window, reading, checking and "
              "folding updates). A federation of real hospitals training in parallel pays "
              "the per-task work once: at 200 hospitals its overhead would be about "
              f"{t.get('parallel_estimate_s_at_200', float('nan')):.2f} s a round.", "",
              "Targets (issue 15): overhead under 2 s per round at 200 hospitals: "
              f"**{t.get('overhead_under_2s_at_200')}** for the simulation with every "
              "hospital in one process, "
              f"**{t.get('aggregator_overhead_under_2s_at_200')}** for what the aggregator "
              "and Redis add; aggregator peak at 200 within 1.2x "
              f"of its peak at 10: **{t.get('aggregator_peak_within_1_2x')}** "
              f"(ratio {t.get('aggregator_peak_ratio_200_vs_10', float('nan')):.3f}); Redis "
              f"peak under 2x the in-flight cap: **{t.get('redis_peak_under_2x_cap')}**.", "",
              "![per hospital count](img/scale.png)", ""]
    live = doc.get("liveness")
    if live:
        lines += [f"Liveness: one round of {live['hospitals']} hospitals with "
                  f"{live['killed']} killed mid-round (their worker process, SIGKILL, when it "
                  f"took its first task): completed with {live['participants']} "
                  f"participants, {live['failed_worker_lost']} failed as \"worker lost\", in "
                  f"{live['round_s']:.0f} s (deadline {live['deadline_s']:.0f} s); the run "
                  f"ended {live['run_end_after_kill_s']:.0f} s after the kill.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hospitals", default="10,50,200")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-in-flight", type=int, default=64)
    p.add_argument("--liveness", default="200:20",
                   help="N:K: one round of N hospitals with K killed mid-round ('' to skip)")
    p.add_argument("--merge", action="store_true",
                   help="with --hospitals '': add only the liveness row to --out")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/scale.json"))
    p.add_argument("--doc", default=str(ROOT / "docs/benchmarks-scale.md"))
    p.add_argument("--plot", default=str(ROOT / "docs/img/scale.png"))
    args = p.parse_args()
    rows = [measure(int(n), args) for n in args.hospitals.split(",") if n]
    earlier = (json.loads(Path(args.out).read_text())
               if args.merge and Path(args.out).exists() else None)
    doc = {**header(), "args": vars(args), "rows": rows}
    if earlier and not rows:  # keep the rows (and their method) measured before
        doc.update(rows=earlier["rows"], args=earlier["args"],
                   command=f"{earlier['command']}; {doc['command']}",
                   date=f"{earlier['date']}; {doc['date']}")
    doc["targets"] = targets(doc["rows"])
    if args.liveness:
        n, dead = (int(v) for v in args.liveness.split(":"))
        doc["liveness"] = liveness(n, dead, args)
    elif earlier and earlier.get("liveness"):
        doc["liveness"] = earlier["liveness"]
    write_json(args.out, doc)
    plot(doc["rows"], Path(args.plot))
    Path(args.doc).write_text(markdown(doc))
    print(f"\nwrote {args.out}, {args.doc}, {args.plot}: {doc['targets']}")


if __name__ == "__main__":
    main()
