"""Virtual hospitals: one worker process serving many hospitals, for simulation.

An ML engineer tries a strategy on 50 or 200 hospitals before a consortium exists. Each
virtual hospital keeps everything a real one has (its queue ``hospital.<id>``, its data
partition, its state folder, its signing key, its heartbeat) and runs through exactly the
same task code (services/client/worker.py ``register_tasks``), wire format, signing and
validation. What they share is the process and one Trainer (hospital.TrainerCache), so 200
hospitals cost one TensorFlow runtime and one model, not 200. A task goes to the hospital
whose queue it came from (``delivery_info["routing_key"]``); the aggregator's signature on
it names that hospital, so a task routed to the wrong one is refused as for a real worker.

The process trains one hospital at a time (solo pool, prefetch 1); run several processes
for more concurrency. Real and virtual hospitals mix freely in one run: the aggregator sees
only queues. Not for production: virtual hospitals share one broker login (no per-hospital
ACL isolation) and one machine.

    leukofed client virtual --hospitals-dir DIR [--ids a,b,...]
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Queue
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from leukofed import startup
from leukofed.logging import install_celery_logging
from leukofed.transport import (
    DEFAULT_BROKER_URL,
    DEFAULT_VISIBILITY_TIMEOUT_S,
    QUEUE_PREFIX,
    check_hospital_id,
    hospital_of_queue,
    make_celery,
    queue_name,
)
from services.client.hospital import HospitalClient, TrainerCache
from services.client.settings import ClientSettings
from services.client.worker import register_tasks, solo_worker_argv

log = logging.getLogger(__name__)


class VirtualSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LEUKOFED_VIRTUAL_", env_file=".env",
                                      extra="ignore")

    hospitals_dir: Path = Field(description="one sub-folder (image archive) per hospital, as "
                                            "`leukofed data partition` writes them")
    hospitals: str = Field("", description="comma-separated ids; default: every sub-folder")
    broker_url: str = Field(DEFAULT_BROKER_URL, description="the shared broker (no ACL "
                                                           "isolation for virtual hospitals)")
    result_backend: str | None = Field(None, description="defaults to broker_url")
    state_dir: Path = Field(Path(".run/virtual"), description="<state_dir>/<id> per hospital")
    cache_dir: Path = Field(Path(".cache"), description="decoded-image cache")
    keys_dir: Path | None = Field(
        None, description="<id>.key per hospital and aggregator.pub (`leukofed simulate` "
                          "writes them); without it the hospitals run unsigned (dev mode)")
    block_size: int = Field(16, description="file numbers per group (the split's blocks)")
    visibility_timeout_s: int = Field(DEFAULT_VISIBILITY_TIMEOUT_S,
                                      description="longer than any local training")

    @field_validator("hospitals")
    @classmethod
    def _ids(cls, value: str) -> str:
        return ",".join(check_hospital_id(h.strip()) for h in value.split(",") if h.strip())

    def hospital_ids(self) -> list[str]:
        if self.hospitals:
            return self.hospitals.split(",")
        return sorted(p.name for p in self.hospitals_dir.iterdir()
                      if p.is_dir() and _is_id(p.name))

    def hospital(self, hospital_id: str) -> ClientSettings:
        """What a real worker of this hospital would be configured with."""
        keys: dict[str, Path] = {}
        if self.keys_dir is not None:
            keys = {"signing_key_file": self.keys_dir / f"{hospital_id}.key",
                    "aggregator_public_key_file": self.keys_dir / "aggregator.pub"}
        return ClientSettings(
            hospital_id=hospital_id, data_dir=self.hospitals_dir / hospital_id,
            broker_url=self.broker_url, result_backend=self.result_backend,
            state_dir=self.state_dir / hospital_id, cache_dir=self.cache_dir,
            block_size=self.block_size, visibility_timeout_s=self.visibility_timeout_s,
            isolate=False, credentials_dir=None, **keys)


def _is_id(name: str) -> bool:
    return hospital_of_queue(QUEUE_PREFIX + name) is not None  # the one id rule


def create_virtual_app(
        settings: VirtualSettings | None = None,
        client_factory: Callable[..., HospitalClient] = HospitalClient) -> Celery:
    """One Celery app consuming the queue of every virtual hospital of ``settings``."""
    settings = settings or VirtualSettings()  # type: ignore[call-arg]
    ids = settings.hospital_ids()
    if not ids:
        raise ValueError(f"no hospitals in {settings.hospitals_dir}")
    per_hospital = {h: settings.hospital(h) for h in ids}
    for h, s in per_hospital.items():
        if not s.data_dir.is_dir():
            raise ValueError(f"hospital {h}: data folder not found: {s.data_dir}")
    first = per_hospital[ids[0]]
    startup.enforce(f"{len(ids)} virtual hospitals", first.startup_problems(),
                    first.startup_secrets())
    app = make_celery(f"leukofed-virtual-{ids[0]}", settings.broker_url,
                      settings.result_backend, settings.visibility_timeout_s)
    app.conf.task_queues = [Queue(queue_name(h)) for h in ids]
    app.conf.task_default_queue = queue_name(ids[0])
    install_celery_logging("client", hospital=f"virtual:{len(ids)}")
    trainers = TrainerCache()
    clients: dict[str, HospitalClient] = {}

    def client_for(request: Any) -> HospitalClient:
        info = getattr(request, "delivery_info", None) or {}
        hospital = hospital_of_queue(str(info.get("routing_key") or ""))
        if hospital not in per_hospital:
            raise ValueError(f"task from queue {info.get('routing_key')!r}: not a hospital "
                             "this worker serves")
        if hospital not in clients:
            clients[hospital] = client_factory(per_hospital[hospital], trainers)
        return clients[hospital]

    register_tasks(app, client_for, ids)
    app.leukofed_virtual = settings  # type: ignore[attr-defined]
    return app


def virtual_worker_argv(settings: VirtualSettings, loglevel: str = "INFO") -> list[str]:
    ids = settings.hospital_ids()
    return solo_worker_argv(ids, f"virtual-{ids[0]}", loglevel)


def __getattr__(name: str) -> Any:
    # `celery -A services.client.virtual worker`: the app from LEUKOFED_VIRTUAL_* settings.
    if name in ("app", "celery"):
        value = create_virtual_app()
        globals()["app"] = globals()["celery"] = value
        return value
    raise AttributeError(name)
