"""The Celery worker of ONE hospital: ``celery -A services.client.worker worker --pool solo``.

Settings come from ``LEUKOFED_CLIENT_*`` (services/client/settings.py). The app's only queue
is ``hospital.<id>``. One HospitalClient (and so one Trainer) lives per worker process and is
reused by every round. ``--pool solo`` keeps training in the worker process itself: with one
training at a time there is nothing to gain from forking, and TensorFlow dislikes fork.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from functools import cache
from typing import Any

from celery import Celery
from celery.signals import worker_ready

from leukofed import startup
from leukofed.liveness import Heartbeat
from leukofed.logging import install_celery_logging
from leukofed.protocol import WireMap
from leukofed.transport import (
    GLOBAL_BLOB_PREFIX,
    TASK_CALIBRATE,
    TASK_DESCRIBE,
    TASK_EVALUATE,
    TASK_FIT,
    TASK_SECAGG_KEYS,
    TASK_SECAGG_REVEAL,
    TASK_SECAGG_SHARES,
    make_celery,
    queue_name,
)
from services.client.hospital import HospitalClient
from services.client.settings import ClientSettings

log = logging.getLogger(__name__)


def create_app(settings: ClientSettings | None = None,
               client_factory: Callable[[ClientSettings], HospitalClient] = HospitalClient
               ) -> Celery:
    """The hospital's Celery app; ``client_factory`` makes its one HospitalClient (the test
    suite's drills pass a subclass)."""
    settings = settings or ClientSettings()  # type: ignore[call-arg]
    startup.enforce(f"hospital {settings.hospital_id}", settings.startup_problems(),
                    settings.startup_secrets())
    app = make_celery(f"leukofed-client-{settings.hospital_id}", settings.broker_url,
                      settings.result_backend, settings.visibility_timeout_s,
                      hospital_id=settings.hospital_id, isolate=bool(settings.isolate),
                      tls=settings.tls)
    install_celery_logging("client", hospital=settings.hospital_id)  # JSON lines with ids

    @cache
    def client() -> HospitalClient:
        return client_factory(settings)

    register_tasks(app, lambda request: client(), [settings.hospital_id])
    app.leukofed_settings = settings  # type: ignore[attr-defined]
    return app


def register_tasks(app: Celery, client_for: Callable[[Any], HospitalClient],
                   hospitals: list[str]) -> None:
    """The hospital tasks on ``app``. ``client_for(request)`` is the HospitalClient a task
    request is for: the worker's one hospital, or (services/client/virtual.py) the virtual
    hospital whose queue the task came from. Also starts the heartbeat of ``hospitals``
    (leukofed.liveness) once the worker is consuming."""

    shared = SharedBlobs(lambda: app.backend.client)

    # shared=False: these closures belong to this app and its clients only (Celery's default
    # also attaches a task to every app made later in the process, so a second app here,
    # a virtual worker's or a test's, ran the first app's closure and HospitalClient).
    # bind=True: the answer's signature names the Celery task id it answers.
    # global_ref: the global weights were stored once for every hospital (shared mode);
    # the signature (auth) is over the real weights, so it is checked as for inline ones.
    @app.task(name=TASK_FIT, bind=True, shared=False)
    def fit(self: Any, blob: bytes, config: WireMap, auth: Any = None,
            global_ref: str | None = None) -> WireMap:
        # auth: the aggregator's signature over (task, blob, config), see leukofed.signing
        client = client_for(self.request)
        return answered(client, auth, client.fit(shared.resolve(blob, global_ref), config,
                                                 auth, task_id=self.request.id),
                        self.request.id)

    @app.task(name=TASK_EVALUATE, bind=True, shared=False)
    def evaluate(self: Any, blob: bytes, config: WireMap, auth: Any = None,
                 global_ref: str | None = None) -> WireMap:
        client = client_for(self.request)
        return answered(client, auth, client.evaluate(shared.resolve(blob, global_ref),
                                                      config, auth, task_id=self.request.id),
                        self.request.id)

    @app.task(name=TASK_CALIBRATE, bind=True, shared=False)
    def calibrate(self: Any, blob: bytes, config: WireMap, auth: Any = None,
                  global_ref: str | None = None) -> WireMap:
        client = client_for(self.request)
        return answered(client, auth, client.calibrate(shared.resolve(blob, global_ref),
                                                       config, auth, task_id=self.request.id),
                        self.request.id)

    def secure_stage(task: str) -> Any:
        # blob: empty; the arguments keep the (blob, config) shape the task signature binds
        def run(self: Any, blob: bytes, config: WireMap, auth: Any = None) -> WireMap:
            client = client_for(self.request)
            return answered(client, auth, client.secure_stage(task, blob, config, auth),
                            self.request.id)
        return app.task(name=task, bind=True, shared=False)(run)

    for task in (TASK_SECAGG_KEYS, TASK_SECAGG_SHARES, TASK_SECAGG_REVEAL):
        secure_stage(task)

    # config: the run and the nonce the declaration is signed for (services/aggregator/
    # gather.py); blob: empty, kept so the task signature binds (blob, config) like others.
    @app.task(name=TASK_DESCRIBE, bind=True, shared=False)
    def describe(self: Any, blob: bytes = b"", config: WireMap | None = None,
                 auth: Any = None) -> WireMap:
        client = client_for(self.request)
        return answered(client, auth, client.describe(auth, config=config, blob=blob,
                                                      task_id=self.request.id),
                        self.request.id)

    def start_heartbeat(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:  # another app's worker in this process
            return
        beating = Heartbeat(lambda: app.backend.client, hospitals)
        beating.start()
        app.leukofed_heartbeat = beating  # type: ignore[attr-defined]

    worker_ready.connect(start_heartbeat, weak=False)


def answered(client: HospitalClient, auth: Any, answer: WireMap, task_id: str = ""
             ) -> WireMap:
    """``answer``, once the task it answers is recorded as completed (services/client/
    completed.py): a replay of it is refused from now on, after a restart too. A task that
    raised, or a worker that died before this line, leaves no record, so Celery's redelivery
    (acks_late) still runs it. The record is written just before Celery stores the result;
    a crash in between makes the redelivery a refused replay, and the round goes on without
    that answer. A declined or error answer is signed here, for the task it answers
    (HospitalClient.sign_refusal)."""
    client.task_completed(auth)
    return client.sign_refusal(answer, task_id)


class SharedBlobs:
    """Global weights sent by reference: fetched from Redis once per digest and kept (the
    last two), so the virtual hospitals of one process fetch a round's model once."""

    def __init__(self, client: Callable[[], Any]) -> None:
        self.client = client
        self.cache: OrderedDict[str, bytes] = OrderedDict()

    def resolve(self, blob: bytes, ref: str | None) -> bytes:
        if not ref:
            return blob
        if ref not in self.cache:
            fetched = self.client().get(GLOBAL_BLOB_PREFIX + str(ref))
            if fetched is None:
                raise LookupError(f"the global weights {str(ref)[:12]} are gone from the "
                                  "broker (expired past the round deadline, or the broker "
                                  "restarted without them)")
            if hashlib.sha256(fetched).hexdigest() != ref:
                raise ValueError(f"the global weights stored as {str(ref)[:12]} do not "
                                 "match their digest")
            self.cache[ref] = bytes(fetched)
            while len(self.cache) > 2:
                self.cache.popitem(last=False)
        self.cache.move_to_end(ref)
        return self.cache[ref]


def worker_argv(settings: ClientSettings, loglevel: str = "INFO") -> list[str]:
    return solo_worker_argv([settings.hospital_id], settings.hospital_id, loglevel)


def solo_worker_argv(hospitals: list[str], node: str, loglevel: str = "INFO") -> list[str]:
    """`celery worker` arguments: one task at a time, the queues of ``hospitals`` only."""
    return ["worker", "--pool", "solo", "--concurrency", "1",
            "-Q", ",".join(queue_name(h) for h in hospitals), "-n", f"{node}@%h",
            "--loglevel", loglevel, "--without-gossip", "--without-mingle"]


def __getattr__(name: str) -> Any:
    # `celery -A services.client.worker` looks up `app`/`celery`; build it on first access so
    # importing this module (tests, the CLI) needs no settings in the environment.
    if name in ("app", "celery"):
        value = create_app()
        globals()["app"] = globals()["celery"] = value
        return value
    raise AttributeError(name)
