"""Shared fixtures: real data location, synthetic images, and real servers on free ports.

Integration fixtures start real processes (redis-server, an MLflow tracking server) on
ports picked at run time, and stop them afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from leukofed.synthetic import write_synthetic_dataset, write_synthetic_image  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
# Services refuse to start without keys and tokens outside development mode
# (leukofed.startup); tests start them bare unless they test the keys, and the tests of the
# refusal itself clear this.
os.environ.setdefault("LEUKOFED_DEV_MODE", "1")
REAL_DATA = Path(os.environ.get("LEUKOFED_REAL_DATA", ROOT.parent / "shared" / "data" / "all-pbs"))
VENV_BIN = Path(sys.executable).parent


def infra_security(name: str) -> Any:
    """A script of infra/security (gen_acl, make_certs, compose_secrets), loaded as a
    module: they are scripts the operator runs, not a package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "infra" / "security" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "Benign").is_dir():
        pytest.skip(f"real images not found at {REAL_DATA} (set LEUKOFED_REAL_DATA)")
    return REAL_DATA


@pytest.fixture
def synthetic_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make(per_class=20, folders=CLASSES)`` writes a class-per-folder dataset."""

    def make(per_class: int = 20, folders: tuple[str, ...] = ("Benign", "Early", "Pre", "Pro"),
             root: Path | None = None, suffix: str = ".png") -> Path:
        return write_synthetic_dataset(root or tmp_path / "data", per_class, folders, suffix)

    return make


@dataclass
class RedisServer:
    port: int
    dir: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.dir), "--save", "", "--appendonly", "yes", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 20, self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def restart(self, downtime: float = 1.0) -> None:
        self.stop()
        time.sleep(downtime)
        self.start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `make setup`")
    server = RedisServer(free_port(), tmp_path / "redis")
    server.dir.mkdir()
    server.start()
    yield server
    server.stop()


@dataclass
class MlflowServer:
    url: str
    root: Path


@contextlib.contextmanager
def running_mlflow(root: Path, *args: str, env: dict[str, str] | None = None
                   ) -> Iterator[str]:
    """``mlflow server`` (SQLite store, local artifacts, ``args`` added) on a free port:
    yields its URL, stops it after."""
    port = free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", *args, "--backend-store-uri",
         f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env,
    )
    try:
        wait_for_port(port, 120, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real MLflow tracking server (SQLite store, local artifacts) for the whole session."""
    root = tmp_path_factory.mktemp("mlflow")
    with running_mlflow(root) as url:
        yield MlflowServer(url, root)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Real-data tests train or scan the real images: they are the slow tier too."""
    for item in items:
        if item.get_closest_marker("realdata"):
            item.add_marker(pytest.mark.slow)
