"""Everything the compose stack needs to start closed, in one command (``make secrets``).

    python infra/security/compose_secrets.py --hospitals a b c

writes, under ``secrets/`` (git-ignored):

* ``redis/users.acl``: one Redis user per hospital (its own key prefix, an allowlist of
  commands), the aggregator, the health check (PING only) and the monitor (gen_acl.py);
* ``tls/``: a CA, the broker's certificate (names ``redis``, ``localhost``) and one client
  certificate per broker user: each hospital, the aggregator, the health check and the
  monitor (make_certs.py; the broker requires one, ``tls-auth-clients yes``);
* ``keys/``: the aggregator's and each hospital's Ed25519 key pair (leukofed.signing), and
  ``keys/hospitals/`` with only the hospitals' public keys (what the aggregator and each
  hospital's peers read);
* ``hospital-<id>/``: what that hospital, and only it, receives: ``tls/ca.crt``,
  ``tls/<id>.crt``, ``tls/<id>.key``, ``keys/<id>.key``, ``keys/aggregator.pub`` and
  ``keys/hospitals/`` (its client reads the folder as LEUKOFED_CLIENT_CREDENTIALS_DIR);

and fills ``.env`` (from ``.env.example`` when absent): the Redis passwords of the ACL, and
every other secret that is still empty or ``change-me`` (database, admin token, API key,
MLflow users, Flower). Values someone set by hand are kept, and the Redis passwords already
in ``.env`` are reused, so running it again changes nothing but what was missing. The
services refuse to start while any ``change-me`` is left (leukofed.startup).

Run as root, it gives each file to the user of the container that reads it (10001 for the
leukofed images, 999 for Redis); otherwise it prints the ``chown`` to run.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_acl  # noqa: E402
import make_certs  # noqa: E402

from leukofed.signing import generate_keypair, private_dir, write_private  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PLACEHOLDER = "change-me"
SERVICE_UID = 10001  # the leukofed images' user
REDIS_UID = 999  # the redis image's user
# Broker users that are not parties: the redis container's health check and Flower.
SERVICE_CLIENTS = ("healthcheck", "monitor")
# .env variables drawn at random when empty or change-me (Redis ones come from the ACL).
GENERATED = ("POSTGRES_PASSWORD", "AGGREGATOR_ADMIN_TOKEN", "INFERENCE_API_KEY",
             "MLFLOW_ADMIN_PASSWORD", "MLFLOW_AGGREGATOR_PASSWORD", "MLFLOW_INFERENCE_PASSWORD",
             "MLFLOW_SECRET_KEY")


def redis_variable(user: str) -> str:
    return f"REDIS_{user.upper().replace('-', '_')}_PASSWORD" if user in (
        "aggregator", "healthcheck", "monitor") else f"REDIS_HOSPITAL_{user.upper()}_PASSWORD"


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        if m := re.match(r"^([A-Z0-9_]+)=(.*)$", line.strip()):
            out[m.group(1)] = m.group(2)
    return out


def write_env(path: Path, values: dict[str, str]) -> None:
    """Set ``values`` in the .env file, in place where a line exists, else appended."""
    lines = path.read_text().splitlines() if path.is_file() else []
    done = set()
    for i, line in enumerate(lines):
        m = re.match(r"^([A-Z0-9_]+)=", line.strip())
        if m and m.group(1) in values:
            lines[i] = f"{m.group(1)}={values[m.group(1)]}"
            done.add(m.group(1))
    lines += [f"{k}={v}" for k, v in values.items() if k not in done]
    private_env(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")


def private_env(path: Path) -> None:
    """Make the .env file 0600 before any secret goes into it: created 0600 when absent, and
    narrowed when it already exists (the mode of ``os.open`` applies only to a new file, so a
    .env copied by hand from the example would otherwise stay 0644, world-readable)."""
    if path.exists():
        os.chmod(path, 0o600)
    else:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def unset(value: str | None) -> bool:
    return not value or PLACEHOLDER in value


def generate(hospitals: list[str], out: Path, env_path: Path) -> dict[str, str]:
    """Write the secrets and fill .env; returns the .env values it set."""
    private_dir(out)  # first, so nothing below is ever reachable by others
    for sub in ("redis", "tls", "keys", "keys/hospitals"):
        private_dir(out / sub)
    fresh = not env_path.exists()
    private_env(env_path)  # 0600 before the example's text (or any secret) goes in
    if fresh and (ROOT / ".env.example").is_file():
        env_path.write_text((ROOT / ".env.example").read_text())
    env = read_env(env_path)
    users = [*hospitals, "aggregator", "healthcheck", "monitor"]
    keep = {u: env[redis_variable(u)] for u in users if not unset(env.get(redis_variable(u)))}
    passwords = gen_acl.generate(hospitals, out / "redis", passwords=keep, service_users=True)
    # A client certificate for every broker user: redis.conf has tls-auth-clients yes, so
    # the health check and the monitor present one too (a password alone gets nobody in).
    make_certs.generate([*hospitals, "aggregator", *SERVICE_CLIENTS], out / "tls",
                        server_names=["redis", "localhost"])
    keys = out / "keys"
    for name in ["aggregator", *hospitals]:
        if not (keys / f"{name}.key").exists():
            generate_keypair(keys, name)
    for h in hospitals:
        shutil.copy(keys / f"{h}.pub", keys / "hospitals" / f"{h}.pub")
    for h in hospitals:
        hospital_credentials(out, h)
    # What an earlier run (or a restored backup) left wider is narrowed: every key and
    # password file 0600, every folder 0700. New files were 0600 from the start.
    for path in out.rglob("*"):
        if path.is_dir():
            private_dir(path)
        elif path.suffix in (".key", ".password") or path.name == "users.acl":
            os.chmod(path, 0o600)
    values = {redis_variable(u): p for u, p in passwords.items()}
    values |= {k: secrets.token_urlsafe(32) for k in GENERATED if unset(env.get(k))}
    if unset(env.get("FLOWER_BASIC_AUTH")):
        values["FLOWER_BASIC_AUTH"] = f"admin:{secrets.token_urlsafe(24)}"
    write_env(env_path, values)
    return values


def hospital_credentials(out: Path, hospital: str) -> Path:
    """OUT/hospital-<id>/: the files one hospital's client needs, nobody else's secrets."""
    bundle = private_dir(out / f"hospital-{hospital}")
    files = {"tls/ca.crt": out / "tls" / "ca.crt",
             f"tls/{hospital}.crt": out / "tls" / f"{hospital}.crt",
             f"tls/{hospital}.key": out / "tls" / f"{hospital}.key",
             f"keys/{hospital}.key": out / "keys" / f"{hospital}.key",
             "keys/aggregator.pub": out / "keys" / "aggregator.pub"}
    files |= {f"keys/hospitals/{p.name}": p for p in (out / "keys" / "hospitals").glob("*.pub")}
    for name, source in files.items():
        target = bundle / name
        for folder in reversed(target.relative_to(bundle).parents[:-1]):
            private_dir(bundle / folder)
        if target.suffix == ".key":  # never copy then chmod: 0600 from the moment it exists
            write_private(target, source.read_bytes())
        else:
            shutil.copy(source, target)
    return bundle


def give_to_containers(out: Path) -> str | None:
    """chown each file to the container user reading it; returns the command when not root."""
    redis_files = [out / "redis" / "users.acl", out / "tls" / "server.key",
                   out / "tls" / "server.crt", out / "tls" / "healthcheck.key",
                   out / "tls" / "healthcheck.crt"]
    if os.geteuid() != 0:
        return (f"sudo chown -R {SERVICE_UID}:{SERVICE_UID} {out} && sudo chown "
                f"{REDIS_UID}:{REDIS_UID} {' '.join(str(p) for p in redis_files)}")
    for path in [out, *out.rglob("*")]:
        os.chown(path, SERVICE_UID, SERVICE_UID)
    for path in redis_files:
        os.chown(path, REDIS_UID, REDIS_UID)
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hospitals", nargs="+", default=["a", "b", "c"])
    parser.add_argument("--out", type=Path, default=ROOT / "secrets")
    parser.add_argument("--env", type=Path, default=ROOT / ".env")
    parser.add_argument("--no-chown", action="store_true", help="leave file owners as they are")
    args = parser.parse_args(argv)
    values = generate(args.hospitals, args.out, args.env)
    print(f"wrote {args.out}/redis, {args.out}/tls and {args.out}/keys; set "
          f"{len(values)} secrets in {args.env}")
    left = [k for k, v in read_env(args.env).items() if PLACEHOLDER in v]
    if left:
        print(f"still {PLACEHOLDER!r} in {args.env}: {', '.join(left)}", file=sys.stderr)
    if not args.no_chown and (command := give_to_containers(args.out)):
        print(f"not root: give the files to the containers' users with:\n  {command}")


if __name__ == "__main__":
    main()
