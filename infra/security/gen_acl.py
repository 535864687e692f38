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
from leukofed.liveness import heartbeat_key  # noqa: E402
from leukofed.signing import write_private  # noqa: E402
from leukofed.transport import check_hospital_id, key_prefix, queue_name  # noqa: E402

# Celery/kombu need these beyond key and pub/sub commands; @dangerous is what must never run.
COMMANDS = "+@all -@dangerous -@admin +info +client|setname +client|id"
# A hospital gets an exact allowlist, never +@all and never whole command families: the
# commands a Celery worker and its result backend send (kombu's Redis transport with
# global_keyprefix: its queue list, the unacknowledged hash and sorted set, the binding sets
# and their Lua scripts, the unacked mutex; Celery's backend: results as strings with an
# expiry, result notifications over pub/sub; redis-py: AUTH/HELLO/PING, CLIENT SETNAME,
# MULTI/EXEC/WATCH pipelines). tests/integration/test_security_isolation_round.py runs a real
# round as these users and checks Redis logged no refusal, so the list is what the honest path
# needs. A command Redis adds in a later version is not granted by accident.
#
# What is left out on purpose (issue 26, finding 9):
# * commands that make Redis allocate far more than the client sends (SETRANGE and SETBIT
#   with a large offset, BITFIELD, APPEND loops, SORT/SUNIONSTORE/ZUNIONSTORE/COPY and every
#   other *STORE that duplicates data server-side, RESTORE): with them a few bytes from one
#   hospital filled maxmemory, after which every party's writes fail (noeviction). Without
#   them every byte a hospital puts in Redis crossed its own connection first; what bounds
#   that volume is maxmemory headroom and the memory alarm (docs/security.md);
# * SCAN, RANDOMKEY, KEYS, PUBSUB CHANNELS/NUMSUB/NUMPAT, INFO: Redis does not filter them by
#   the user's key patterns, so they would list other hospitals' queues and task ids;
# * the @scripting family: SCRIPT FLUSH / KILL and FUNCTION FLUSH / DELETE / RESTORE act
#   server-wide. EVAL, EVALSHA and SCRIPT LOAD stay (redis-py's register_script: EVALSHA,
#   then SCRIPT LOAD on NOSCRIPT); a script reaches only the keys it is passed, Redis checks
#   those against the user's key patterns and checks every command the script calls against
#   this same list, so a script cannot run SETRANGE either.
HOSPITAL_COMMANDS = " ".join([
    "-@all",
    # connection (redis-py's handshake and health check)
    "+auth +hello +ping +echo +select +quit +reset +client|setname +client|getname +client|id",
    # queues: kombu pushes, pops (BRPOP) and restores; results of pidbox replies
    "+lpush +rpush +rpop +brpop +llen",
    # kombu's unacknowledged messages: hash of payloads, sorted set of delivery times
    "+hset +hget +hdel +hlen +zadd +zrem +zrange +zrangebyscore +zrevrangebyscore",
    # exchange bindings (sets) and their Lua scripts (SADD, TIME, ZADD, EXISTS, DEL, ZREM)
    "+sadd +srem +smembers +time +exists",
    # Celery results (strings with an expiry), the unacked mutex (SET NX PX)
    "+get +mget +set +setex +psetex +del +unlink +expire +pexpire +ttl +pttl +type",
    # pipelines and optimistic locks
    "+multi +exec +discard +watch +unwatch",
    # Lua, without the server-wide SCRIPT and FUNCTION subcommands (redis-py pipelines check
    # SCRIPT EXISTS before EVALSHA)
    "+eval +evalsha +script|load +script|exists",
    # pub/sub: results and remote control; not PUBSUB CHANNELS/NUMSUB/NUMPAT
    "+publish +subscribe +unsubscribe +psubscribe +punsubscribe",
])
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


# The compose stack's two service users. The health check may only PING. The monitor
# (Flower) counts: it reads the length of each hospital's queue and its worker's heartbeat
# (a timestamp), read-only (%R~) and nothing else. It gets no result key, no unacknowledged
# hash, no LRANGE of a queue and no channel, so it sees no update, no task and no weights
# (issue 26, finding 9: it had the aggregator's rights and could read every update).
HEALTHCHECK_LINE = "user healthcheck on #{digest} resetkeys resetchannels -@all +ping"
MONITOR_COMMANDS = ("-@all +auth +hello +ping +select +quit +reset +client|setname "
                    "+client|id +llen +exists +type +ttl +pttl +get +mget")


def monitor_line(password: str, hospitals: list[str]) -> str:
    """Read-only counting on each hospital's queue (its priority variants included) and
    heartbeat key; no channel at all."""
    digest = hashlib.sha256(password.encode()).hexdigest()
    keys = " ".join(f"%R~{key_prefix(h)}{queue_name(h)}* %R~{heartbeat_key(h)}"
                    for h in hospitals)
    return f"user monitor on #{digest} resetkeys {keys} resetchannels {MONITOR_COMMANDS}"


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
        lines.append(monitor_line(passwords["monitor"], hospitals))
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
