"""Helpers for the federated integration tests: hospital datasets, real Celery worker
processes, a real uvicorn aggregator process, and polling the REST API."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from conftest import (
    ROOT,
    VENV_BIN,
    free_port,
    infra_security,
    wait_for_port,
    write_synthetic_image,
)

CLASS_FOLDERS = ("Benign", "Early", "Pre", "Pro")
TINY = {"model": "compact_cnn", "image_size": 32, "local_epochs": 1, "batch_size": 8,
        "learning_rate": 1e-3, "jit_compile": False, "seed": 1}


def hospital_data(root: Path, hospital: str, per_class: int = 6) -> Path:
    """A small class-per-folder archive; file names carry the hospital id so a leak of a
    file name onto the wire is easy to spot."""
    offset = (ord(hospital[0]) - ord("a") + 1) * 100
    for label, folder in enumerate(CLASS_FOLDERS):
        for i in range(per_class):
            write_synthetic_image(root / hospital / folder / f"patient-{hospital}-{i + 1:03d}.png",
                                  label, seed=label * 1000 + offset + i, size=32)
    return root / hospital


def _env(extra: dict[str, str]) -> dict[str, str]:
    # The suite's development mode (tests/conftest.py) stays: the stack runs without keys.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LEUKOFED_") or k == "LEUKOFED_DEV_MODE"}
    env.update(PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
               CUDA_VISIBLE_DEVICES="", TF_NUM_INTEROP_THREADS="1", TF_NUM_INTRAOP_THREADS="1")
    env.update(extra)
    return env


class ProcessGroup:
    """A subprocess started in its own session, stopped with its whole process group."""

    proc: subprocess.Popen | None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, grace_s: float = 20) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Worker(ProcessGroup):
    hospital: str
    data_dir: Path
    broker_url: str
    state_dir: Path
    cache_dir: Path
    extra: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @classmethod
    def in_tmp(cls, tmp_path: Path, hospital: str, broker_url: str,
               env: dict[str, str] | None = None, per_class: int = 6) -> Worker:
        """The layout every test uses: a synthetic archive in ``tmp_path/hospitals/<id>``,
        state in ``tmp_path/state-<id>``, one decode cache shared by the hospitals."""
        return cls(hospital, hospital_data(tmp_path / "hospitals", hospital, per_class),
                   broker_url, tmp_path / f"state-{hospital}", tmp_path / "cache", env or {})

    def start(self) -> Worker:
        from services.client.settings import ClientSettings
        from services.client.worker import worker_argv

        self.log_path = self.state_dir.parent / f"worker-{self.hospital}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = _env({"LEUKOFED_CLIENT_HOSPITAL_ID": self.hospital,
                    "LEUKOFED_CLIENT_DATA_DIR": str(self.data_dir),
                    "LEUKOFED_CLIENT_BROKER_URL": self.broker_url,
                    "LEUKOFED_CLIENT_STATE_DIR": str(self.state_dir),
                    "LEUKOFED_CLIENT_CACHE_DIR": str(self.cache_dir),
                    "LEUKOFED_CLIENT_BLOCK_SIZE": "2", **self.extra})
        # A drill (tests/integration/drills.py) runs the same app with a faulty client.
        drill = any(k.startswith("LEUKOFED_DRILL_") for k in self.extra)
        if drill:
            env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{Path(__file__).resolve().parent}"
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                # The command line `leukofed client worker` runs.
                [str(VENV_BIN / "celery"), "-A", "drills" if drill else "services.client.worker",
                 *worker_argv(ClientSettings(hospital_id=self.hospital,
                                             data_dir=self.data_dir))],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 180) -> None:  # TF import on a loaded 2-core box
        wait_log(self.log_path, "ready.", timeout, self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


@dataclass
class VirtualWorker(ProcessGroup):
    """One process serving many virtual hospitals (services/client/virtual.py), started as
    `leukofed client virtual` starts it."""

    name: str
    hospitals: list[str]
    hospitals_dir: Path
    broker_url: str
    state_dir: Path
    cache_dir: Path
    extra: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    def start(self) -> VirtualWorker:
        self.log_path = self.state_dir / f"virtual-{self.name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = _env({"LEUKOFED_VIRTUAL_HOSPITALS_DIR": str(self.hospitals_dir),
                    "LEUKOFED_VIRTUAL_HOSPITALS": ",".join(self.hospitals),
                    "LEUKOFED_VIRTUAL_BROKER_URL": self.broker_url,
                    "LEUKOFED_VIRTUAL_STATE_DIR": str(self.state_dir),
                    "LEUKOFED_VIRTUAL_CACHE_DIR": str(self.cache_dir),
                    "LEUKOFED_VIRTUAL_BLOCK_SIZE": "2", **self.extra})
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "leukofed"), "client", "virtual"], cwd=ROOT, env=env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 180) -> None:
        wait_log(self.log_path, "ready.", timeout, self.proc)


def signing_env(keys: Path, hospital: str) -> dict[str, str]:
    """A hospital worker's signing settings for keys made by ``leukofed keys generate``."""
    return {"LEUKOFED_CLIENT_SIGNING_KEY_FILE": str(keys / f"{hospital}.key"),
            "LEUKOFED_CLIENT_AGGREGATOR_PUBLIC_KEY_FILE": str(keys / "aggregator.pub")}


def wait_log(path: Path | None, text: str, timeout: float,
             proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path and path.exists() and text in path.read_text(errors="replace"):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before {text!r}; log:\n"
                               + (path.read_text()[-3000:] if path and path.exists() else ""))
        time.sleep(0.2)
    raise TimeoutError(f"{text!r} not in {path} after {timeout}s")


@dataclass
class AggregatorProcess(ProcessGroup):
    broker_url: str
    state_dir: Path
    tracking_uri: str | None
    port: int = field(default_factory=free_port)
    model_name: str = "leukofed-test"
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> AggregatorProcess:
        log_path = self.state_dir.parent / "aggregator.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = _env({"LEUKOFED_AGGREGATOR_BROKER_URL": self.broker_url,
                    "LEUKOFED_AGGREGATOR_STATE_DIR": str(self.state_dir),
                    "LEUKOFED_AGGREGATOR_MODEL_NAME": self.model_name,
                    "LEUKOFED_AGGREGATOR_POLL_INTERVAL_S": "0.1",
                    "LEUKOFED_AGGREGATOR_CACHE_DIR": str(self.state_dir.parent / "cache"),
                    "LEUKOFED_AGGREGATOR_TRACKING": "true" if self.tracking_uri else "false"})
        if self.tracking_uri:
            env["LEUKOFED_AGGREGATOR_MLFLOW_TRACKING_URI"] = self.tracking_uri
        with log_path.open("a") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "uvicorn"), "services.aggregator.app:create_app", "--factory",
                 "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        wait_for_port(self.port, 90, self.proc)
        return self



def start_run(url: str, config: dict[str, Any]) -> str:
    response = httpx.post(f"{url}/v1/runs", json={**TINY, **config}, timeout=30)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def get_run(url: str, run_id: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/runs/{run_id}", timeout=30)
    response.raise_for_status()
    return response.json()


def wait_run(get: Callable[[], dict[str, Any]], until: Callable[[dict[str, Any]], bool],
             timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            run = get()
        except httpx.HTTPError:
            run = {}
        if run and until(run):
            return run
        time.sleep(0.3)
    raise TimeoutError(f"run did not reach the expected state in {timeout}s: "
                       f"{ {k: run.get(k) for k in ('status', 'reason', 'completed_round')} }"
                       f"\nevents: {[e['message'] for e in run.get('events', [])][-15:]}")


def wait_live(dispatcher: Any, expected: set[str], timeout: float = 60) -> set[str] | None:
    """Poll the dispatcher's ping until exactly ``expected`` answer (or time runs out) and
    return the last answer. One short ping right after a worker logs "ready." can miss it on a
    loaded 2-core box (CI once saw {'a'} for {'a', 'b'}); a worker that never answers still
    fails the caller's assertion."""
    deadline = time.monotonic() + timeout
    live = dispatcher.live_hospitals()
    while live != expected and time.monotonic() < deadline:
        time.sleep(0.5)
        live = dispatcher.live_hospitals()
    return live


def finished(run: dict[str, Any]) -> bool:
    return run.get("status") in ("completed", "failed", "cancelled")


def run_to_end(client: Any, config: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Start a run (TINY plus ``config``) through an in-process aggregator's TestClient and
    return its record once it has finished."""
    response = client.post("/v1/runs", json={**TINY, **config})
    assert response.status_code == 201, response.text
    run_id = response.json()["id"]
    return wait_run(lambda: client.get(f"/v1/runs/{run_id}").json(), finished, timeout)


@contextlib.contextmanager
def acl_redis_server(tmp_path: Path, hospitals: list[str], extra_acl_lines: tuple[str, ...] = ()
                     ) -> Iterator[tuple[int, dict[str, str]]]:
    """A real redis-server with the ACL file generated for ``hospitals``: (port, passwords)."""
    acl = tmp_path / "acl"
    passwords = infra_security("gen_acl").generate(hospitals, acl)
    with (acl / "users.acl").open("a") as f:
        f.writelines(f"{line}\n" for line in extra_acl_lines)
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--dir", str(tmp_path), "--aclfile",
                             str(acl / "users.acl")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 20, proc)
        yield port, passwords
    finally:
        proc.terminate()
        proc.wait(10)
