"""Generate Redis ACL users from the list of hospitals: ``users.acl`` plus one password file
per user (mode 0600), so each party gets only its own secret.

    python infra/security/gen_acl.py --out infra/security/generated a b c

* ``default`` is disabled: no anonymous access at all.
* hospital ``<id>``: keys ``~<id>:*`` and channels ``&<id>:*`` only (the prefix of
  leukofed.transport.key_prefix), and no dangerous/admin commands (no KEYS, FLUSHALL,
  CONFIG, MONITOR, ACL...). With Celery's ``global_keyprefix`` every queue, unacked,
  binding and result key and every pub/sub channel of that hospital lies under the prefix.
* ``aggregator``: every hospital's prefix (it holds one connection per hospital), still
  without dangerous commands.
Passwords are stored in users.acl as SHA-256 (``#<hex>``), never in clear.
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from leukofed.signing import write_private  # noqa: E402
from leukofed.transport import check_hospital_id, key_prefix  # noqa: E402

# Celery/kombu need these beyond key and pub/sub commands; @dangerous is what must never run.
COMMANDS = "+@all -@dangerous -@admin +info +client|setname +client|id"
# A hospital gets an allowlist, never +@all: the command families a Celery worker and its
# result backend use (lists for queues, hashes and sorted sets for unacknowledged
# messages, sets for bindings, strings for results, pub/sub, MULTI/EXEC and scripts), then
# everything dangerous taken out again. A command Redis adds in a later version is not
# granted by accident. Beyond key patterns, a hospital must not learn what others do: Redis
# does not filter SCAN, RANDOMKEY or KEYS by the user's key patterns (they list every key
# name, other hospitals' queues and task ids included), PUBSUB CHANNELS lists every active
# channel, and INFO gives the keyspace and the connected clients; none is granted. What
# stays: EVAL, EVALSHA and SCRIPT LOAD, which kombu's Redis transport and Celery's result
# backend use through redis-py's register_script (EVALSHA, then SCRIPT LOAD on NOSCRIPT); a
# script can touch only the keys it is passed, and Redis checks those against the user's key
# patterns, so EVAL reaches no other hospital's keys. Never the whole @scripting family:
# SCRIPT FLUSH / SCRIPT KILL and FUNCTION FLUSH / DELETE / RESTORE act server-wide, on
# every hospital's and the aggregator's scripts.
HOSPITAL_COMMANDS = ("-@all +@connection +@list +@hash +@set +@sortedset +@string +@pubsub "
                     "+eval +evalsha +script|load +@transaction +del +unlink +exists +expire "
                     "+pexpire +ttl +pttl +type +time -@dangerous -@admin +client|setname "
                     "+client|id -info -scan -randomkey -keys -pubsub|channels -pubsub|numpat "
                     "-pubsub|numsub -pubsub|shardchannels -pubsub|shardnumsub")
# kombu subscribes to fanout exchanges (Celery's remote control, ``celery.pidbox``) with
# PSUBSCRIBE, and Redis checks a PSUBSCRIBE pattern *literally* against the user's channel
# patterns (it is not glob-matched like a channel name), so ``&a:*`` alone makes a worker's
# remote-control subscription fail with NOPERM. The exact pattern kombu uses is allowed;
# it has no wildcard, so it reaches no other channel. ``/<db>.`` is kombu's fanout prefix
# for the database number in the broker URL (workers run without gossip, so no celeryev).
FANOUT_CHANNELS = ("celery.pidbox",)


def fanout_channels(prefix: str, db: int = 0) -> list[str]:
    return [f"{prefix}/{db}.{exchange}" for exchange in FANOUT_CHANNELS]


def user_line(name: str, password: str, prefixes: list[str], db: int = 0,
              commands: str = COMMANDS) -> str:
    digest = hashlib.sha256(password.encode()).hexdigest()
    keys = " ".join(f"~{p}*" for p in prefixes)
    channels = " ".join([f"&{p}*" for p in prefixes]
                        + [f"&{c}" for p in prefixes for c in fanout_channels(p, db)])
    return f"user {name} on #{digest} resetkeys {keys} resetchannels {channels} {commands}"


def _secret_file(path: Path, value: str) -> None:
    write_private(path, (value + "\n").encode())  # 0600 from the start, even over a 0644


# The compose stack's two service users: the health check may only PING; the monitor
# (Flower) sees every hospital's prefix, as the aggregator does.
HEALTHCHECK_LINE = "user healthcheck on #{digest} resetkeys resetchannels -@all +ping"


def generate(hospitals: list[str], out: Path, db: int = 0,
             passwords: dict[str, str] | None = None, service_users: bool = False
             ) -> dict[str, str]:
    """Write users.acl and <user>.password files; return {user: password}. ``passwords``:
    ones to keep (others are drawn at random); ``service_users``: add ``healthcheck`` and
    ``monitor`` (the compose stack's)."""
    hospitals = [check_hospital_id(h) for h in hospitals]
    reserved = {"aggregator", "healthcheck", "monitor"}
    if reserved & set(hospitals) or len(set(hospitals)) != len(hospitals):
        raise ValueError(f"hospital ids must be unique and not one of {sorted(reserved)}")
    out.mkdir(parents=True, exist_ok=True)
    users = [*hospitals, "aggregator", *(("healthcheck", "monitor") if service_users else ())]
    passwords = {u: (passwords or {}).get(u) or secrets.token_urlsafe(32) for u in users}
    prefixes = [key_prefix(h) for h in hospitals]
    lines = ["user default off resetkeys resetchannels -@all"]
    lines += [user_line(h, passwords[h], [key_prefix(h)], db, HOSPITAL_COMMANDS)
              for h in hospitals]
    lines.append(user_line("aggregator", passwords["aggregator"], prefixes, db))
    if service_users:
        digest = hashlib.sha256(passwords["healthcheck"].encode()).hexdigest()
        lines.append(HEALTHCHECK_LINE.format(digest=digest))
        lines.append(user_line("monitor", passwords["monitor"], prefixes, db))
    # The ACL holds the passwords' digests: only its reader (Redis) may see it.
    write_private(out / "users.acl", ("\n".join(lines) + "\n").encode())
    for user, password in passwords.items():
        _secret_file(out / f"{user}.password", password)
    return passwords


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hospitals", nargs="+")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "generated")
    parser.add_argument("--db", type=int, default=0,
                        help="Redis database number of the broker URLs (default 0)")
    args = parser.parse_args()
    generate(args.hospitals, args.out, args.db)
    print(f"wrote {args.out / 'users.acl'} and one .password file per user; start redis with "
          f"--aclfile {args.out / 'users.acl'}")


if __name__ == "__main__":
    main()
