"""The broker as compose runs it (issue 26, finding 9): a real redis-server started from
infra/redis/redis.conf (only paths and the port changed), with the ACL file and certificates
that `make secrets` writes (infra/security/compose_secrets.py). A password alone does not get
in, the compose health check does (with its own certificate), a hospital cannot make Redis
allocate memory it did not send, and the monitor reads no update."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import yaml
from conftest import ROOT, free_port, infra_security, wait_for_port
from redis.backoff import NoBackoff
from redis.retry import Retry

from leukofed.transport import tls_options

pytestmark = pytest.mark.integration

HOSPITALS = ["a", "b"]
MAXMEMORY = 64 * 2**20  # small, so that an amplified write would cross it at once


@dataclass
class Broker:
    port: int
    secrets: Path
    passwords: dict[str, str]  # .env's values: REDIS_HOSPITAL_A_PASSWORD, ...

    def password(self, user: str) -> str:
        return self.passwords[infra_security("compose_secrets").redis_variable(user)]

    def client(self, user: str, certificate: str | None = "own") -> redis.Redis:
        """``user`` over TLS with its password; its own client certificate, another's
        (a name), or none (None)."""
        tls = self.secrets / "tls"
        cert = user if certificate == "own" else certificate
        options = tls_options(str(tls / "ca.crt"), cert and str(tls / f"{cert}.crt"),
                              cert and str(tls / f"{cert}.key"))
        assert options is not None
        return redis.Redis(host="127.0.0.1", port=self.port, username=user,
                           password=self.password(user), ssl=True, socket_timeout=5,
                           retry=Retry(NoBackoff(), 0), **options)


def redis_conf(secrets: Path, port: int, data: Path) -> str:
    """infra/redis/redis.conf with the container's paths pointed at this test's files."""
    text = (ROOT / "infra/redis/redis.conf").read_text()
    replacements = {"bind 0.0.0.0 -::*": "bind 127.0.0.1", "tls-port 6379": f"tls-port {port}",
                    "/usr/local/etc/redis/users.acl": str(secrets / "redis" / "users.acl"),
                    "/tls/": f"{secrets / 'tls'}/", "dir /data": f"dir {data}"}
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `make setup`")
    tmp = tmp_path_factory.mktemp("broker")
    secrets = tmp / "secrets"
    values = infra_security("compose_secrets").generate(HOSPITALS, secrets, tmp / ".env")
    port = free_port()
    data = tmp / "data"
    data.mkdir()
    conf = tmp / "redis.conf"
    conf.write_text(redis_conf(secrets, port, data))
    proc = subprocess.Popen(["redis-server", str(conf), "--maxmemory", str(MAXMEMORY)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 20, proc)
        yield Broker(port, secrets, values)
    finally:
        proc.terminate()
        proc.wait(10)


def _refused(attempts: dict[str, object]) -> dict[str, str]:
    """{what: how it ended} for every attempt that was NOT refused by the ACL."""
    let_through = {}
    for what, attempt in attempts.items():
        try:
            attempt()  # type: ignore[operator]
            let_through[what] = "ran"
        except redis.exceptions.NoPermissionError:
            pass
        except redis.exceptions.RedisError as exc:  # inside Lua, the ACL says it this way
            if "user executing the script can't run this command" not in str(exc):
                let_through[what] = f"{type(exc).__name__}: {exc}"
    return let_through


def test_attack_password_alone_gets_into_the_broker(broker: Broker) -> None:
    """tls-auth-clients yes: the right password without a client certificate is refused at
    the handshake; with its certificate the same user gets in."""
    assert broker.client("a").ping()
    for user in ("a", "aggregator", "healthcheck", "monitor"):
        with pytest.raises(redis.exceptions.ConnectionError):
            broker.client(user, certificate=None).ping()


def test_compose_health_check_presents_its_certificate(broker: Broker) -> None:
    """The redis service's health check from docker-compose.yml, run as written (paths and
    port pointed here): PONG with its certificate; the same command without one fails."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    kind, command = compose["services"]["redis"]["healthcheck"]["test"]
    assert kind == "CMD-SHELL" and "--cert /tls/healthcheck.crt" in command
    command = (command.replace("$$", "$").replace("/tls/", f"{broker.secrets / 'tls'}/")
               .replace("redis-cli ", f"redis-cli -h 127.0.0.1 -p {broker.port} ", 1))
    env = {**os.environ, "REDIS_HEALTHCHECK_PASSWORD": broker.password("healthcheck")}
    ok = subprocess.run(["sh", "-c", command], env=env, capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    cert = f"--cert {broker.secrets / 'tls'}/healthcheck.crt --key {broker.secrets / 'tls'}" \
           "/healthcheck.key"
    assert cert in command
    bare = subprocess.run(["sh", "-c", command.replace(cert, "")], env=env,
                          capture_output=True, timeout=30)
    assert bare.returncode != 0


def test_attack_hospital_fills_broker_memory_with_tiny_commands(broker: Broker) -> None:
    """`SETRANGE a:big 70000000 x` (and every other command that makes Redis allocate far
    more than it was sent) took the broker past maxmemory with a few bytes; then every
    party's writes failed under noeviction, the aggregator's task LPUSH included. Now each
    is refused (from a Lua script too), and the aggregator still queues a task."""
    a = broker.client("a")
    aggregator = broker.client("aggregator")
    a.set("a:small", b"x" * 1000)
    a.sadd("a:set", b"m")
    a.zadd("a:zset", {b"m": 1})
    attempts = {
        "setrange far out": lambda: a.setrange("a:big", 70_000_000, b"x"),
        "setbit far out": lambda: a.setbit("a:bits", 500_000_000, 1),
        "bitfield far out": lambda: a.bitfield("a:bf").set("u8", 400_000_000, 1).execute(),
        "append": lambda: a.append("a:small", b"y"),
        "copy": lambda: a.copy("a:small", "a:copy"),
        "sort into a key": lambda: a.sort("a:set", store="a:sorted", alpha=True),
        "sunionstore": lambda: a.sunionstore("a:union", ["a:set"]),
        "zunionstore": lambda: a.zunionstore("a:zunion", ["a:zset"]),
        "lset": lambda: a.lset("a:hospital.a", 0, b"x"),
        "restore": lambda: a.restore("a:restored", 0, b"\x00"),
        "setrange in a script": lambda: a.eval(
            "return redis.call('SETRANGE', KEYS[1], 70000000, 'x')", 1, "a:big"),
    }
    assert _refused(attempts) == {}
    memory = aggregator.info("memory")
    assert memory["used_memory"] < MAXMEMORY / 2, memory["used_memory_human"]
    aggregator.lpush("b:hospital.b", b"t" * 2**20)  # a task for the other hospital
    assert aggregator.llen("b:hospital.b") == 1
    aggregator.delete("b:hospital.b")


def test_attack_monitor_reads_every_update(broker: Broker) -> None:
    """The monitor had the aggregator's rights on every hospital's keys: it could read each
    update (results), task (queues, unacknowledged messages) and channel. Now it reads queue
    lengths and heartbeats, and nothing it reads or does carries a payload."""
    from leukofed.liveness import beat, heartbeat_key

    aggregator = broker.client("aggregator")
    aggregator.lpush("a:hospital.a", b"task with the global weights")
    aggregator.set("a:celery-task-meta-1", b"hospital a's update")
    aggregator.hset("a:unacked", "tag", b"a task being worked on")
    beat(broker.client("a"), ["a"])
    monitor = broker.client("monitor")
    assert monitor.llen("a:hospital.a") == 1  # what it is for: queue depths, liveness
    assert monitor.get(heartbeat_key("a")) is not None
    attempts = {
        "read an update": lambda: monitor.get("a:celery-task-meta-1"),
        "read updates in bulk": lambda: monitor.mget(["a:celery-task-meta-1"]),
        "read a queued task": lambda: monitor.lrange("a:hospital.a", 0, -1),
        "read unacknowledged tasks": lambda: monitor.hgetall("a:unacked"),
        "dump a key": lambda: monitor.dump("a:celery-task-meta-1"),
        "list key names": lambda: monitor.scan(0),
        "write into a queue": lambda: monitor.lpush("a:hospital.a", b"x"),
        "pop a task": lambda: monitor.rpop("a:hospital.a"),
        "delete a queue": lambda: monitor.delete("a:hospital.a"),
        "publish": lambda: monitor.publish("a:/0.celery.pidbox", b"x"),
        "server info": lambda: monitor.info(),
    }
    assert _refused(attempts) == {}
    sub = monitor.pubsub()
    with pytest.raises(redis.exceptions.NoPermissionError):
        sub.subscribe("a:celery-task-meta-1")
        sub.get_message(timeout=1)
    aggregator.delete("a:hospital.a", "a:celery-task-meta-1", "a:unacked")


def test_broker_configuration_as_the_issue_asks(broker: Broker) -> None:
    """Static: hospitals' lines hold no whole command family and no server-wide script or
    function command; the monitor's keys are read-only; redis.conf requires certificates."""
    conf = (ROOT / "infra/redis/redis.conf").read_text().splitlines()
    assert "tls-auth-clients yes" in conf
    assert not [line for line in conf if line.startswith("tls-auth-clients") and "yes" not in line]
    acl = (broker.secrets / "redis" / "users.acl").read_text().splitlines()
    lines = {line.split()[1]: line.split() for line in acl}
    for hospital in HOSPITALS:
        grants = lines[hospital]
        families = [g for g in grants if g.startswith("+@")]
        assert families == [], families
        for forbidden in ("+script", "+script|flush", "+script|kill", "+function",
                          "+function|flush", "+fcall", "+setrange", "+setbit", "+bitfield",
                          "+append", "+copy", "+sort", "+keys", "+scan", "+info"):
            assert forbidden not in grants, (hospital, forbidden)
    monitor = lines["monitor"]
    keys = [g for g in monitor if "~" in g and g != "resetkeys"]
    assert keys and all(g.startswith("%R~") for g in keys), keys
    assert not [g for g in monitor if g.startswith("&") or g.startswith("+@")]


def test_attack_hospital_fills_broker_memory_with_real_bytes(broker: Broker) -> None:
    """Without amplification a hospital can still send the bytes itself: SET under its own
    prefix is what Celery's results need. Hospital a writes 4 MB values in bursts, more than
    maxmemory in all; after each burst the aggregator's broker guard (what its thread runs
    every interval_s) cuts a back to its quota, largest keys first, and the aggregator still
    queues b's task. Then a floods key names: cut back to the key cap. b is never touched."""
    from services.aggregator.broker_guard import BrokerGuard

    a, aggregator = broker.client("a"), broker.client("aggregator")
    quota = 8 * 2**20
    guard = BrokerGuard(aggregator, HOSPITALS, quota_bytes=quota, max_keys=50)
    aggregator.lpush("b:hospital.b", b"b's task" * 1000)
    value = b"x" * (4 * 2**20)
    written = 0
    for burst in range(8):
        for i in range(5):
            a.set(f"a:junk:{burst}:{i}", value)
            written += len(value)
        deleted = guard.check()
        assert set(deleted) == {"a"} and len(deleted["a"]) >= 3, deleted
        assert guard.usage["a"][0] <= quota
        aggregator.lpush("b:hospital.b", b"t" * 2**18)  # would fail at maxmemory
    assert written > 2 * MAXMEMORY  # without the guard this could not have fit
    assert aggregator.llen("b:hospital.b") == 9 and guard.enforced == {"a": 8}
    pipe = a.pipeline(transaction=False)
    for i in range(500):
        pipe.set(f"a:name:{i}", b"1")
    pipe.execute()
    guard.check()
    assert guard.usage["a"][1] <= 50 and guard.usage["b"][1] == 1
    metrics = "".join(f"{m.name} {s.labels} {s.value}\n" for m in guard.collect()
                      for s in m.samples)
    assert "leukofed_broker_hospital_bytes {'hospital': 'a'}" in metrics
    assert "leukofed_broker_memory_alarm {} 0" in metrics
    aggregator.delete("b:hospital.b")
    for key in aggregator.scan_iter(match="a:*"):
        aggregator.unlink(key)


def test_broker_memory_alarm(broker: Broker) -> None:
    """Used memory at 80% of maxmemory raises the alarm (log and /metrics) before writes
    start failing, whoever holds it."""
    from services.aggregator.broker_guard import BrokerGuard

    a, aggregator = broker.client("a"), broker.client("aggregator")
    guard = BrokerGuard(aggregator, HOSPITALS, quota_bytes=2**30)
    guard.check()
    assert not guard.alarm and guard.memory is not None
    value = b"x" * (2**20 - 64)  # under an allocator size class, so ~1 MB each
    for i in range(MAXMEMORY // len(value)):
        a.set(f"a:big:{i}", value)
        guard.check()
        if guard.alarm:
            break
    assert guard.alarm and guard.memory is not None and guard.memory[1] == MAXMEMORY
    alarm = [s.value for m in guard.collect() if m.name == "leukofed_broker_memory_alarm"
             for s in m.samples]
    assert alarm == [1]
    for key in aggregator.scan_iter(match="a:*"):
        aggregator.unlink(key)
