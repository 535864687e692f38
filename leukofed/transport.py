"""Celery over Redis: the one place both the aggregator and the hospital workers configure it.

Why these settings:

* No pickle anywhere: a pickle payload is code, and a broker shared by many hospitals must
  never execute what another party put on it. Tasks and results are msgpack (weights travel as
  msgpack binary, see leukofed.wire); JSON is accepted too because Celery's remote-control
  replies (ping, inspect) may use it.
* ``task_acks_late``: a task is acknowledged after it ran, so a worker killed mid-training
  does not silently lose the message. The Redis visibility timeout must then be longer than
  the longest local training, otherwise Redis hands a still-running task to another consumer.
  Stale redeliveries are harmless: every task carries an ``expires`` (its round deadline).
* Retry forever on connection loss (broker and result backend), so a restarted redis-server
  is survived by workers and aggregator without a human.
* One queue per hospital, ``hospital.<id>``: a worker consumes only its own queue, so a task
  meant for hospital A can never run on hospital B's data.
"""

from __future__ import annotations

import re

from celery import Celery
from kombu import Queue

QUEUE_PREFIX = "hospital."
TASK_FIT = "leukofed.client.fit"
TASK_EVALUATE = "leukofed.client.evaluate"
TASK_DESCRIBE = "leukofed.client.describe"
# BatchNorm statistics of the new global weights over the hospital's training images
# (aggregate per-channel means and variances, like those every fit update already carries).
TASK_CALIBRATE = "leukofed.client.calibrate"
# Secure aggregation's own stages (leukofed.secagg): public keys, encrypted shares, reveal.
TASK_SECAGG_KEYS = "leukofed.client.secagg_keys"
TASK_SECAGG_SHARES = "leukofed.client.secagg_shares"
TASK_SECAGG_REVEAL = "leukofed.client.secagg_reveal"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
# A task's global weights above this size travel by reference (shared mode only): stored
# once per round under GLOBAL_BLOB_PREFIX + sha256, the task carrying only the digest, so
# Redis holds one copy of the model instead of one per queued task (docs/scale.md).
SHARED_BLOB_MIN_BYTES = 64 * 1024
GLOBAL_BLOB_PREFIX = "leukofed.global."
DEFAULT_VISIBILITY_TIMEOUT_S = 6 * 3600  # longer than any local training we run
ACCEPTED_CONTENT = ["msgpack", "json"]
_HOSPITAL_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


def check_hospital_id(hospital_id: str) -> str:
    """Ids become queue and worker names: lowercase letters, digits, '-' and '_' only."""
    if not isinstance(hospital_id, str) or not _HOSPITAL_ID.fullmatch(hospital_id):
        raise ValueError(
            f"invalid hospital id {hospital_id!r}: use 1-32 of a-z, 0-9, '-', '_' "
            "(starting with a letter or digit)")
    return hospital_id


def queue_name(hospital_id: str) -> str:
    return QUEUE_PREFIX + check_hospital_id(hospital_id)


def hospital_of_queue(queue: str) -> str | None:
    """The hospital id of a ``hospital.<id>`` queue name, else None."""
    if not queue.startswith(QUEUE_PREFIX):
        return None
    hid = queue[len(QUEUE_PREFIX):]
    return hid if _HOSPITAL_ID.fullmatch(hid) else None


def key_prefix(hospital_id: str) -> str:
    """Every Redis key and pub/sub channel of one hospital's traffic starts with this, so an
    ACL user limited to ``~<id>:*`` and ``&<id>:*`` (infra/security) can reach nothing else.
    Ids contain no ':', so no hospital's prefix is a prefix of another's."""
    return check_hospital_id(hospital_id) + ":"


def tls_options(ca_file: str | None, cert_file: str | None = None,
                key_file: str | None = None) -> dict[str, object] | None:
    """redis-py SSL options for ``rediss://``: verify the server against our CA; with a
    client certificate when the server asks for one (``tls-auth-clients yes``)."""
    if not ca_file:
        return None
    import ssl

    opts: dict[str, object] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": ca_file}
    if cert_file:
        opts.update(ssl_certfile=cert_file, ssl_keyfile=key_file)
    return opts


def check_tls(broker_url: str, ca_file: object, cert_file: object, key_file: object) -> None:
    """Refuse half-configured TLS at start-up rather than at the first connection: a
    ``rediss://`` URL needs the CA (we never skip server verification), TLS files need a
    ``rediss://`` URL (they would be silently unused otherwise), and a certificate needs its
    key."""
    secure = broker_url.startswith("rediss://")
    if secure and not ca_file:
        raise ValueError("a rediss:// broker URL needs tls_ca_file (the CA that signed the "
                         "broker's certificate; infra/security/make_certs.py)")
    if (ca_file or cert_file) and not secure:
        raise ValueError("TLS files are set but the broker URL is not rediss://")
    if bool(cert_file) != bool(key_file):
        raise ValueError("tls_cert_file and tls_key_file go together")


def make_celery(
    name: str,
    broker_url: str = DEFAULT_BROKER_URL,
    result_backend: str | None = None,
    visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S,
    hospital_id: str | None = None,
    isolate: bool = False,
    tls: dict[str, object] | None = None,
) -> Celery:
    """A Celery app with leukofed's transport settings. With ``hospital_id`` the app's only
    queue is that hospital's, so a worker started without ``-Q`` still consumes nothing else.

    ``isolate`` (needs ``hospital_id``): kombu's ``global_keyprefix`` puts every key of this
    app (queue, ``unacked``, ``unacked_index``, bindings, results) and every pub/sub channel
    (remote control, result notifications) under ``key_prefix(hospital_id)``. Key patterns
    alone cannot isolate hospitals because kombu shares those structures between queues; with
    one prefix per hospital nothing is shared, and the aggregator holds one app per hospital.
    ``tls``: ``tls_options(...)``, for ``rediss://`` URLs."""
    app = Celery(name, broker=broker_url, backend=result_backend or broker_url)
    transport_options = {
        "visibility_timeout": visibility_timeout_s,
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
        "retry_on_timeout": True,
        "health_check_interval": 10,
    }
    app.conf.update(
        task_serializer="msgpack",
        result_serializer="msgpack",
        accept_content=ACCEPTED_CONTENT,
        result_accept_content=ACCEPTED_CONTENT,
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # one training at a time; the next waits in Redis
        task_track_started=True,
        result_expires=3600,
        result_extended=False,  # results hold only what the task returned
        broker_transport_options=transport_options,
        result_backend_transport_options={"retry_policy": {"timeout": 5.0}},
        broker_connection_retry=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # forever: redis restarts must be survived
        broker_channel_error_retry=True,
        result_backend_always_retry=True,
        result_backend_max_retries=float("inf"),
        redis_retry_on_timeout=True,
        redis_socket_connect_timeout=5,
        redis_socket_timeout=30,
        redis_backend_health_check_interval=10,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 60, "interval_start": 0.2,
                                   "interval_step": 0.5, "interval_max": 2.0},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_enable_remote_control=True,  # ping / active_queues tell who is live
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_pool_limit=4,
    )
    if isolate:
        if hospital_id is None:
            raise ValueError("isolate needs hospital_id")
        prefix = key_prefix(hospital_id)
        app.conf.broker_transport_options = {**transport_options, "global_keyprefix": prefix}
        app.conf.result_backend_transport_options = {
            **app.conf.result_backend_transport_options, "global_keyprefix": prefix}
    if tls:
        app.conf.broker_use_ssl = dict(tls)
        app.conf.redis_backend_use_ssl = dict(tls)
    if hospital_id is not None:
        q = queue_name(hospital_id)
        app.conf.task_default_queue = q
        app.conf.task_queues = [Queue(q)]
    return app
