"""`scripts/stack.sh` (what `make up/down` run) against real processes: redis-server, the
MLflow server, the aggregator and the inference service under uvicorn, and one Celery
worker per hospital of a tiny synthetic HOSPITAL_DATA, all on free ports.

up -> every service healthy and the workers live, the stack listed for `down --all` -> a
second up changes nothing -> down -> no process and no bound port left behind.

Both run the stack in its default, signed mode (no LEUKOFED_DEV_MODE), as `make up` and
`make demo` do: keys and secrets made once in RUN_DIR/keys (0700, private files 0600), the
APIs closed without them, and the demo's champion served only with its signature verified.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, free_port, write_synthetic_dataset, write_synthetic_image

pytestmark = pytest.mark.integration

CLASSES = ("Benign", "Early", "Pre", "Pro")
HOSPITALS = ("a", "b")


def _stack(cmd: str, env: dict[str, str], timeout: float = 420) -> str:
    proc = subprocess.run(["bash", "scripts/stack.sh", cmd], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"stack.sh {cmd} failed:\n{out}"
    return out


def _pids(run_dir: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in (run_dir / "pids").glob("*.pid")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) holds no port and runs nothing.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _redis_ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"PING\r\n")
        return conn.recv(64)


def _wait(check, timeout: float, what: str):  # noqa: ANN001, ANN202 (test helper)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(1)
    raise AssertionError(f"{what} not reached after {timeout}s (last error: {last})")


def _bare_env(tmp_path: Path) -> dict[str, str]:
    """Free ports, a RUN_DIR of its own and no LEUKOFED_ setting: the default, signed mode
    (the suite's conftest turns development mode on for everything else)."""
    ports = {name: free_port() for name in
             ("REDIS_PORT", "MLFLOW_PORT", "AGGREGATOR_PORT", "INFERENCE_PORT")}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LEUKOFED_", "MLFLOW_"))}
    env.update({k: str(v) for k, v in ports.items()})
    env.update(RUN_DIR=str(tmp_path / "run"),
               STACKS_FILE=str(tmp_path / "stacks"),  # not the repository's .run/stacks
               LEUKOFED_LOG_FORMAT="json", TF_CPP_MIN_LOG_LEVEL="2")
    return env


def _stop(env: dict[str, str]) -> None:
    """Whatever the test's outcome, leave nothing running."""
    subprocess.run(["bash", "scripts/stack.sh", "down"], cwd=ROOT, env=env,
                   capture_output=True, timeout=120)
    for pid in _pids(Path(env["RUN_DIR"])).values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _assert_private_keys(keys: Path, hospitals: tuple[str, ...]) -> None:
    """The stack's keys and secrets: the folders 0700, every private file 0600."""
    private = {"aggregator.key", *(f"{h}.key" for h in hospitals), "admin-token",
               "inference-api-key"}
    assert private <= {p.name for p in keys.iterdir()}
    assert {p.name for p in (keys / "hospitals").iterdir()} == {f"{h}.pub" for h in hospitals}
    for folder in (keys, keys / "hospitals"):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    for name in private:
        assert (keys / name).stat().st_mode & 0o777 == 0o600, name


@pytest.fixture
def stack_env(tmp_path: Path) -> dict[str, str]:
    data = tmp_path / "hospitals"
    for h_index, hospital in enumerate(HOSPITALS):
        for label, cls in enumerate(CLASSES):
            for i in range(3):
                write_synthetic_image(data / hospital / cls / f"img-{cls}-{i + 1:03d}.png",
                                      label, seed=h_index * 100 + label * 10 + i, size=32)
    env = _bare_env(tmp_path)
    env.update(HOSPITAL_DATA=str(data))
    yield env
    _stop(env)


def test_up_healthy_idempotent_down_clean(stack_env: dict[str, str]) -> None:
    env = stack_env
    run_dir = Path(env["RUN_DIR"])
    port = {k: int(env[k]) for k in ("REDIS_PORT", "MLFLOW_PORT", "AGGREGATOR_PORT",
                                     "INFERENCE_PORT")}
    out = _stack("up", env)
    assert "inference started" in out and "signed mode" in out
    keys = run_dir / "keys"
    _assert_private_keys(keys, HOSPITALS)
    token = {"Authorization": f"Bearer {(keys / 'admin-token').read_text().strip()}"}
    # Listed for `make down` (stack.sh down --all), whatever its RUN_DIR.
    assert Path(env["STACKS_FILE"]).read_text().split() == [str(run_dir.resolve())]

    pids = _pids(run_dir)
    assert set(pids) == {"redis", "mlflow", "aggregator", "inference",
                         *(f"client-{h}" for h in HOSPITALS)}
    assert b"+PONG" in _redis_ping(port["REDIS_PORT"])
    mlflow = f"http://127.0.0.1:{port['MLFLOW_PORT']}"
    agg = f"http://127.0.0.1:{port['AGGREGATOR_PORT']}"
    inf = f"http://127.0.0.1:{port['INFERENCE_PORT']}"
    assert httpx.get(f"{mlflow}/health", timeout=10).status_code == 200
    assert httpx.get(f"{agg}/healthz", timeout=10).json() == {"status": "ok"}
    assert httpx.get(f"{agg}/docs", timeout=10).status_code == 200
    assert httpx.get(f"{inf}/healthz", timeout=10).status_code == 200
    # No champion yet: live but not ready, with the reason.
    ready = httpx.get(f"{inf}/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["ready"] is False

    # Closed without the stack's secrets.
    assert httpx.get(f"{agg}/v1/hospitals", timeout=30).status_code == 401
    assert httpx.get(f"{inf}/v1/model", timeout=10).status_code == 401

    # Workers alive: the aggregator pings them over Celery (inspect active_queues).
    def live() -> bool:
        body = httpx.get(f"{agg}/v1/hospitals", headers=token, timeout=30).json()
        return {h["hospital"] for h in body if h["live"]} == set(HOSPITALS)

    _wait(live, 180, "both hospital workers live")
    metrics = httpx.get(f"{agg}/metrics", timeout=30).text
    assert f"leukofed_hospitals_alive {float(len(HOSPITALS))}" in metrics
    assert "leukofed_http_requests_total" in httpx.get(f"{inf}/metrics", timeout=10).text

    # JSON logs, with the hospital id on the workers' lines.
    worker_lines = [json.loads(line) for line in
                    (run_dir / "logs" / "client-a.log").read_text().splitlines()
                    if line.startswith("{")]
    assert any("ready." in rec["message"] and rec.get("hospital") == "a"
               for rec in worker_lines)
    agg_lines = (run_dir / "logs" / "aggregator.log").read_text().splitlines()
    assert any(json.loads(line).get("service") == "aggregator"
               for line in agg_lines if line.startswith("{"))

    status = subprocess.run(["bash", "scripts/stack.sh", "status"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "inference: running" in status.stdout
    assert "hospital a: live" in status.stdout  # status sends the token from its file

    # A second up is idempotent: nothing restarted, same processes, the same keys.
    secrets = {p.name: p.read_bytes() for p in keys.iterdir() if p.is_file()}
    again = _stack("up", env)
    assert "started" not in again.replace("already running", "")
    assert _pids(run_dir) == pids
    assert {p.name: p.read_bytes() for p in keys.iterdir() if p.is_file()} == secrets

    _stack("down", env, timeout=180)
    assert not list((run_dir / "pids").glob("*.pid"))
    assert Path(env["STACKS_FILE"]).read_text().split() == []
    leftovers = {name: _group_members(pid) for name, pid in pids.items()}
    assert not any(_alive(pid) for pid in pids.values()), leftovers
    assert not any(leftovers.values()), leftovers
    for name, p in port.items():
        assert _port_free(p), f"{name} {p} still bound after down"


def test_demo_serves_its_champion_with_the_signature_verified(tmp_path: Path) -> None:
    """`make demo` (scripts/demo.sh) in its default mode, at the smallest size: 2 hospitals
    of synthetic 32 px images, 1 round of 1 local epoch, the release gate's floors opened
    (a 1-round model passes none). What it prints for its champion: signature verified."""
    env = _bare_env(tmp_path)
    data = write_synthetic_dataset(tmp_path / "data", per_class=48, size=32)
    env.update(DATA=str(data), HOSPITALS="2", ROUNDS="1", LOCAL_EPOCHS="1", IMAGE_SIZE="32",
               BATCH_SIZE="16", LEUKOFED_LOG_FORMAT="text",
               LEUKOFED_GATE_MIN_MACRO_F1="0", LEUKOFED_GATE_MIN_SENSITIVITY="0",
               LEUKOFED_GATE_MIN_SPECIFICITY="0", LEUKOFED_GATE_MIN_CLASS_RECALL="0",
               LEUKOFED_GATE_MAX_COVERAGE_SHORTFALL="1", LEUKOFED_GATE_MAX_REFER_SHARE="1",
               LEUKOFED_GATE_MAX_FOLLOW_COLOUR="1")
    try:
        proc = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        assert "signed mode" in out and "development mode" not in out, out[-4000:]
        served = [line for line in out.splitlines() if line.startswith("champion served:")]
        assert len(served) == 1 and "signature: verified: signed by the aggregator" in \
            served[0], out[-4000:]
        keys = Path(env["RUN_DIR"]) / "keys"
        _assert_private_keys(keys, ("a", "b"))
        # The service says the same to a client with the API key.
        model = httpx.get(f"http://127.0.0.1:{env['INFERENCE_PORT']}/v1/model", timeout=10,
                          headers={"X-API-Key": (keys / "inference-api-key").read_text()})
        assert model.json()["signature"].startswith("verified:"), model.text
    finally:
        _stop(env)
