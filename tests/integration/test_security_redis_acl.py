"""Per-hospital isolation on a real redis-server with the generated ACL (infra/security):
hospital a's user cannot read or write hospital b's queue, results or channels (NOPERM), the
default user is disabled, and a Celery app isolated under a's key prefix works with a's
credentials while the same credentials cannot publish into b's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fedstack import acl_redis_server

from leukofed.transport import make_celery

pytestmark = pytest.mark.integration


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    with acl_redis_server(tmp_path, ["a", "b"]) as server:
        yield server


def test_hospital_a_cannot_touch_hospital_b(acl_redis) -> None:
    port, pw = acl_redis
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port).ping()  # default user: off
    a = redis.Redis(port=port, username="a", password=pw["a"])
    agg = redis.Redis(port=port, username="aggregator", password=pw["aggregator"])
    a.lpush("a:hospital.a", b"mine")  # its own queue
    assert a.llen("a:hospital.a") == 1
    agg.lpush("b:hospital.b", b"task for b")
    agg.set("b:celery-task-meta-1", b"b's result")
    attempts = {
        "read b's queue": lambda: a.lrange("b:hospital.b", 0, -1),
        "steal b's task": lambda: a.rpop("b:hospital.b"),
        "inject into b's queue": lambda: a.lpush("b:hospital.b", b"evil"),
        "read b's result": lambda: a.get("b:celery-task-meta-1"),
        "read b's unacked": lambda: a.hgetall("b:unacked"),
        "publish on b's channel": lambda: a.publish("b:/0.celery.pidbox", b"x"),
        "unprefixed shared unacked": lambda: a.hgetall("unacked"),
        "list every key": lambda: a.keys("*"),
        "flush": lambda: a.flushall(),
        "read config": lambda: a.config_get("requirepass"),
        # Not filtered by key pattern in Redis: they would list b's queue and task ids.
        "scan every key name": lambda: a.scan(0, count=1000),
        "random key name": lambda: a.randomkey(),
        "list active channels": lambda: a.pubsub_channels(),
        "server and keyspace info": lambda: a.info(),
    }
    for what, attempt in attempts.items():
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
            pytest.fail(what)
    sub = a.pubsub()
    with pytest.raises(redis.exceptions.NoPermissionError):
        sub.subscribe("b:celery-task-meta-1")
        sub.get_message(timeout=1)
    assert agg.llen("b:hospital.b") == 1 and agg.get("b:celery-task-meta-1") == b"b's result"


def test_isolated_celery_apps_follow_the_acl(acl_redis) -> None:
    port, pw = acl_redis
    url_a = f"redis://a:{pw['a']}@127.0.0.1:{port}/0"
    own = make_celery("a", url_a, hospital_id="a", isolate=True)
    own.send_task("leukofed.client.describe", queue="hospital.a")  # lands under a:
    agg = redis.Redis(port=port, username="aggregator", password=pw["aggregator"])
    assert agg.llen("a:hospital.a") == 1
    # a's credentials with b's prefix: refused by Redis, whatever the client code does.
    other = make_celery("a-as-b", url_a, hospital_id="b", isolate=True)
    other.conf.task_publish_retry = False
    other.conf.broker_connection_retry = False
    other.conf.broker_connection_max_retries = 0
    with pytest.raises(Exception, match="NOPERM|permission"):
        other.send_task("leukofed.client.describe", queue="hospital.b", retry=False)
    assert agg.llen("b:hospital.b") == 0


def test_attack_hospital_flushes_everyones_scripts(acl_redis) -> None:
    """@scripting would let a hospital run SCRIPT FLUSH or FUNCTION FLUSH, which act
    server-wide (every party's cached scripts and loaded functions). Only EVAL, EVALSHA and
    SCRIPT LOAD are granted: what redis-py's register_script (kombu's transport, Celery's
    result backend) needs, on the hospital's own keys."""
    port, pw = acl_redis
    a = redis.Redis(port=port, username="a", password=pw["a"])
    agg = redis.Redis(port=port, username="aggregator", password=pw["aggregator"])
    # register_script: EVALSHA, NOSCRIPT, SCRIPT LOAD, EVALSHA again, on a's own key
    put = a.register_script("redis.call('SET', KEYS[1], ARGV[1]) return 1")
    assert put(keys=["a:counter"], args=[1]) == 1 and put(keys=["a:counter"], args=[2]) == 1
    assert a.eval("return redis.call('GET', KEYS[1])", 1, "a:counter") == b"2"
    with pytest.raises(redis.exceptions.NoPermissionError):
        a.eval("return redis.call('GET', KEYS[1])", 1, "b:celery-task-meta-1")
    agg_script = agg.register_script("return 1")
    assert agg_script(keys=["b:x"]) == 1
    attempts = {
        "flush every script": lambda: a.script_flush(),
        "kill another's script": lambda: a.script_kill(),
        "flush every function": lambda: a.function_flush(),
        "load a function": lambda: a.function_load(
            "#!lua name=evil\nredis.register_function('f', function() return 1 end)"),
        "delete a function": lambda: a.function_delete("leukofed"),
        "call a function": lambda: a.fcall("f", 0),
    }
    for what, attempt in attempts.items():
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
            pytest.fail(what)
    assert agg.script_exists(agg_script.sha) == [True]  # the aggregator's script survived
