"""``make secrets`` (infra/security/compose_secrets.py) run as a user would run it, then read
as another local user would: nothing secret may be readable or reachable by anyone but the
owner, and a hospital's broker account may not touch server-wide script state."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from .conftest import load_compose

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "security" / "compose_secrets.py"
HOSPITALS = ("a", "b", "c")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_attack_other_local_user_reads_compose_secrets(tmp_path: Path) -> None:
    out, env = tmp_path / "secrets", tmp_path / ".env"
    # What someone who followed .env.example's "or copy it yourself" ends up with: 0644.
    env.write_text((ROOT / ".env.example").read_text())
    env.chmod(0o644)
    # A secrets folder left world-readable by an earlier version or a hand-made mkdir.
    (out / "keys").mkdir(parents=True)
    out.chmod(0o755)
    (out / "keys").chmod(0o755)
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--env", str(env),
                           "--hospitals", *HOSPITALS, "--no-chown"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    assert _mode(env) == 0o600
    assert not [line for line in env.read_text().splitlines()
                if "change-me" in line and not line.startswith("#")]
    assert _mode(out) == 0o700
    folders = [p for p in out.rglob("*") if p.is_dir()]
    assert folders and all(_mode(p) == 0o700 for p in folders), {
        str(p): oct(_mode(p)) for p in folders if _mode(p) != 0o700}
    secret = [p for p in out.rglob("*") if p.is_file()
              and (p.suffix in (".key", ".password") or p.name == "users.acl")]
    # every private key (signing, TLS, CA; the hospitals' bundles too), password and the ACL
    assert len([p for p in secret if p.suffix == ".key"]) >= 2 * (2 * len(HOSPITALS) + 1)
    assert len([p for p in secret if p.suffix == ".password"]) == len(HOSPITALS) + 3
    wide = {str(p): oct(_mode(p)) for p in secret if _mode(p) & 0o077}
    assert wide == {}
    # no temporary file of the 0600-then-rename writes is left behind
    assert not [p for p in out.rglob("*.tmp")]

    # The hospitals' broker accounts: no whole command families that act server-wide.
    acl = (out / "redis" / "users.acl").read_text().splitlines()
    hospital_lines = [line for line in acl if line.split()[1] in HOSPITALS]
    assert len(hospital_lines) == len(HOSPITALS)
    for line in hospital_lines:
        grants = line.split()
        for forbidden in ("+@all", "+@scripting", "+script", "+script|flush", "+script|kill",
                          "+function", "+@dangerous", "+fcall"):
            assert forbidden not in grants, (grants[1], forbidden)
        assert {"+eval", "+evalsha", "+script|load"} <= set(grants)


def test_attack_rerun_over_world_readable_secret_files(tmp_path: Path) -> None:
    """Files that already exist 0644 (an older run, a restored backup) are not rewritten in
    place with their wide mode: after a second run every secret is 0600 again."""
    out, env = tmp_path / "secrets", tmp_path / ".env"
    args = [sys.executable, str(SCRIPT), "--out", str(out), "--env", str(env),
            "--hospitals", *HOSPITALS, "--no-chown"]
    subprocess.run(args, check=True, capture_output=True, timeout=120)
    for path in [env, *out.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    subprocess.run(args, check=True, capture_output=True, timeout=120)
    assert _mode(env) == 0o600 and _mode(out) == 0o700
    for path in out.rglob("*"):
        if path.is_dir():
            assert _mode(path) == 0o700, path
        elif path.suffix in (".key", ".password") or path.name == "users.acl":
            assert _mode(path) == 0o600, path


# The three services that are not leukofed's, and the placeholder each would start with.
THIRD_PARTY = {"redis": "REDIS_HEALTHCHECK_PASSWORD", "postgres": "POSTGRES_PASSWORD",
               "mlflow": "MLFLOW_AUTH_ADMIN_PASSWORD"}


def _stand_ins(tmp_path: Path, *programs: str) -> Path:
    """A folder of programs that only record that they were started (in $MARKER)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in programs:
        stand_in = bin_dir / program
        stand_in.write_text(f'#!/bin/sh\necho "{program} $*" >> "$MARKER"\n')
        stand_in.chmod(0o755)
    return bin_dir


def _start(service: dict, bin_dir: Path, marker: Path) -> subprocess.CompletedProcess:
    """Run the service's entrypoint and command as the container would, with its (already
    interpolated) environment, and stand-ins for the real programs that record a start."""
    env = service.get("environment") or {}
    env = {k: str(v) for k, v in env.items()}
    env |= {"PATH": f"{bin_dir}:/usr/bin:/bin", "MARKER": str(marker)}
    return subprocess.run([*service["entrypoint"], *service["command"]], env=env,
                          capture_output=True, text=True, timeout=30)


def test_attack_third_party_services_start_with_placeholder_passwords(
        tmp_path: Path, example_env: dict[str, str]) -> None:
    """A .env copied from .env.example and never filled: leukofed's services refuse the
    change-me passwords (leukofed.startup); Redis (whose health check logs in with one),
    PostgreSQL and the MLflow server (the admin account) must refuse them too."""
    bin_dir = _stand_ins(tmp_path, "redis-server", "postgres", "mlflow", "docker-entrypoint.sh")
    placeholder = load_compose(example_env)["services"]
    for name, variable in THIRD_PARTY.items():
        assert "change-me" in str(placeholder[name].get("environment")), (name, variable)
        marker = tmp_path / f"{name}.started"
        done = _start(placeholder[name], bin_dir, marker)
        assert done.returncode == 78, (name, done.stdout, done.stderr)
        assert "refusing to start" in done.stderr and "change-me" in done.stderr, name
        assert not marker.exists(), f"{name} started with a placeholder password"
    # it names what is left, so the operator knows what to fill in
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in _start(
        placeholder["mlflow"], bin_dir, tmp_path / "m").stderr

    # With the secrets `make secrets` draws, the same entrypoint starts the real program
    # (through the image's own entrypoint where it has one).
    real = dict(example_env)
    real |= {k: f"s3cret-{k.lower()}" for k, v in example_env.items() if "change-me" in v}
    filled = load_compose(real)["services"]
    for name in THIRD_PARTY:
        marker = tmp_path / f"{name}.ok"
        done = _start(filled[name], bin_dir, marker)
        assert done.returncode == 0, (name, done.stderr)
        assert marker.read_text().startswith("docker-entrypoint.sh "), name
        assert filled[name]["command"][0] in marker.read_text(), name


# Services that check their own secrets with leukofed.startup (tests/unit/test_startup.py).
STARTUP_CHECKED = {"aggregator", "inference", "inference-gpu", "client-a", "client-b",
                   "client-c"}


def test_attack_placeholder_in_any_service_that_gets_a_secret(
        tmp_path: Path, example_env: dict[str, str]) -> None:
    """Issue 26, finding 10: every service that gets a secret refuses a change-me left from
    .env.example, not only Redis, PostgreSQL and the MLflow server. Flower (profile
    monitoring) started with the login admin:change-me and the monitor's broker password,
    and the MLflow account maker with the admin's and the services' placeholders. Every
    service of the file is covered, so a new one that gets a secret without a guard fails."""
    bin_dir = _stand_ins(tmp_path, "redis-server", "postgres", "mlflow", "python", "celery")
    placeholder = load_compose(example_env)["services"]
    guarded = {name for name, service in placeholder.items()
               if "change-me" in str(service.get("environment"))} - STARTUP_CHECKED
    assert {"flower", "mlflow-users", *THIRD_PARTY} <= guarded
    for name in sorted(guarded):
        leftover = sorted(k for k, v in placeholder[name]["environment"].items()
                          if "change-me" in str(v))
        assert placeholder[name].get("entrypoint"), f"nothing in {name} refuses {leftover}"
        marker = tmp_path / f"{name}.started"
        done = _start(placeholder[name], bin_dir, marker)
        assert done.returncode == 78, (name, done.stdout, done.stderr)
        assert all(k in done.stderr for k in leftover), (name, leftover, done.stderr)
        assert not marker.exists(), f"{name} started with a placeholder: {leftover}"
    # Filled in as `make secrets` does, each starts its own program.
    real = dict(example_env)
    real |= {k: v.replace("change-me", f"s3cret-{k.lower()}") for k, v in example_env.items()
             if "change-me" in v}
    filled = load_compose(real)["services"]
    for name in sorted(guarded):
        marker = tmp_path / f"{name}.ok"
        done = _start(filled[name], bin_dir, marker)
        assert done.returncode == 0, (name, done.stderr)
        assert filled[name]["command"][0] in marker.read_text(), name
