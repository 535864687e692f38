"""`leukofed simulate`: try a strategy on many hospitals before a consortium exists.

Partitions an image archive into N hospitals (`leukofed data partition`, blocks of file
numbers, Dirichlet label skew by default), starts the local stack (scripts/stack.sh:
redis-server, MLflow, the aggregator, the inference service) with the hospitals served by
a few processes of virtual hospitals (services/client/virtual.py) instead of one worker
each, starts the run through the REST API and follows it round by round. Every round's
model is registered in MLflow as for a real federation, signed: the stack makes its keys
and the aggregator's admin token (in <work-dir>/run/keys; LEUKOFED_DEV_MODE=1 runs it
unsigned). The stack is stopped at the end, unless --keep: then the command that stops it is
printed (`make down` stops it too).

    leukofed simulate --data ../shared/data/all-pbs --hospitals 50 --alpha 0.5 --rounds 5
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from leukofed.protocol import DEFAULT_IMAGE_SIZE

ROOT = Path(__file__).resolve().parents[2]


def _leukofed() -> str:
    venv = ROOT / ".venv" / "bin" / "leukofed"
    return str(venv) if venv.exists() else "leukofed"


def simulate(
    data: Annotated[Path, typer.Option(help="image archive, one sub-folder per class")],
    hospitals: Annotated[int, typer.Option(help="number of virtual hospitals")] = 10,
    scheme: Annotated[str, typer.Option(help="iid, dirichlet or quantity")] = "dirichlet",
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration")] = 0.5,
    seed: int = 0,
    split_manifest: Annotated[Path | None, typer.Option(
        help="partition its train+val; the aggregator tests on its test split")] = None,
    rounds: int = 5,
    strategy: str = "fedavg",
    model: str = "compact_cnn",
    image_size: int = DEFAULT_IMAGE_SIZE,
    local_epochs: int = 1,
    batch_size: int = 32,
    min_fit_clients: Annotated[int | None, typer.Option(
        help="default: every hospital")] = None,
    round_deadline_s: float = 3600.0,
    workers: Annotated[int, typer.Option(
        help="processes of virtual hospitals (each trains one hospital at a time)")] = 1,
    work_dir: Annotated[Path, typer.Option(help="partition, state and logs")] = Path(
        ".run/simulate"),
    keep: Annotated[bool, typer.Option(
        help="leave the stack up after the run (the command that stops it is printed; "
             "`make down` stops it too)")] = False,
) -> None:
    """Partition DATA into virtual hospitals, start the stack and run a federation."""
    import httpx

    work = work_dir.resolve()
    parts = work / "hospitals"
    cmd = [_leukofed(), "data", "partition", str(data), str(parts), "--hospitals",
           str(hospitals), "--scheme", scheme, "--alpha", str(alpha), "--seed", str(seed),
           "--force"]
    if split_manifest:
        cmd += ["--split-manifest", str(split_manifest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise typer.BadParameter(f"partition failed: {done.stderr.strip()[-500:]}")
    typer.echo(done.stdout)
    ids = sorted(p.name for p in parts.iterdir() if p.is_dir())
    env = {**os.environ, "RUN_DIR": str(work / "run"), "HOSPITAL_DATA": str(parts),
           "VIRTUAL_WORKERS": str(workers), "HOSPITAL_IDS": ",".join(ids)}
    if split_manifest:
        env["SERVER_TEST_MANIFEST"] = str(split_manifest.resolve())
    stack = str(ROOT / "scripts" / "stack.sh")
    subprocess.run([stack, "up"], env=env, check=True)
    api = f"http://127.0.0.1:{env.get('AGGREGATOR_PORT', '8001')}"
    headers = admin_headers(Path(env.get("KEYS_DIR") or work / "run" / "keys"))
    try:
        _wait_workers(work / "run" / "logs", workers)
        config: dict[str, Any] = {
            "name": f"simulate {hospitals} hospitals {scheme} {alpha}", "model": model,
            "image_size": image_size, "rounds": rounds, "strategy": strategy,
            "local_epochs": local_epochs, "batch_size": batch_size, "hospitals": ids,
            "min_fit_clients": min_fit_clients or len(ids), "seed": seed,
            "round_deadline_s": round_deadline_s, "register_models": True}
        if split_manifest:
            config["server_test_manifest"] = str(split_manifest.resolve())
        response = httpx.post(f"{api}/v1/runs", json=config, headers=headers, timeout=60)
        if response.status_code != 201:
            raise typer.BadParameter(f"the aggregator refused the run: {response.text}")
        run_id = response.json()["id"]
        typer.echo(f"run {run_id}: {len(ids)} virtual hospitals in {workers} process(es)")
        rec = follow(api, run_id, headers=headers)
        typer.echo(f"run {rec['status']}" + (f": {rec['reason']}" if rec.get("reason") else "")
                   + f"; versions {rec.get('versions')}")
    finally:
        if not keep:
            subprocess.run([stack, "down"], env=env, check=False)
        else:
            typer.echo(f"the stack is left running (--keep); stop it with: "
                       f"{stop_command(work / 'run')}  (`make down` stops every local stack)")


def stop_command(run_dir: Path) -> str:
    """The one shell command that stops the stack whose state is in ``run_dir``."""
    return (f"RUN_DIR={shlex.quote(str(run_dir))} "
            f"{shlex.quote(str(ROOT / 'scripts' / 'stack.sh'))} down")


def admin_headers(keys_dir: Path) -> dict[str, str]:
    """The bearer token scripts/stack.sh made for its signed stack; none in development
    mode, where it makes no keys (leukofed/local_keys.py)."""
    token = keys_dir / "admin-token"
    return {"Authorization": f"Bearer {token.read_text().strip()}"} if token.is_file() else {}


def _wait_workers(logs: Path, workers: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = sum(1 for i in range(workers) if "ready." in _read(logs / f"virtual-{i}.log"))
        if ready >= workers:
            return
        time.sleep(1)
    raise typer.BadParameter(f"virtual workers not ready after {timeout:.0f} s (logs: {logs})")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def follow(api: str, run_id: str, every_s: float = 2.0,
           headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Print each round as it completes and the step in progress; return the final run."""
    import httpx

    seen, last = 0, ""
    while True:
        rec = httpx.get(f"{api}/v1/runs/{run_id}", headers=headers, timeout=60).json()
        for r in rec["history"][seen:]:
            g = r["global"]
            acc = g.get("server_test_accuracy", g.get("test_accuracy"))
            typer.echo(f"round {r['round']}: {len(r['participants'])} hospitals, "
                       f"accuracy {acc if acc is None else round(acc, 4)}, "
                       f"{r['timings']['round_s']:.1f} s")
        seen = len(rec["history"])
        if rec["status"] in ("completed", "failed", "cancelled"):
            return rec
        p = rec.get("progress") or {}
        step = (f"  round {p.get('round')} {p.get('task')}: {p.get('answered')}/"
                f"{p.get('selected')} answered") if p else ""
        if step and step != last:  # a line when the step moves, not every poll
            typer.echo(f"{step}, {p.get('seconds_left')} s left")
            last = step
        time.sleep(every_s)
