"""What a federated run depends on, in one place: the interfaces the round loop talks to
(Dispatcher: Celery; ModelOps: Keras; Tracker: MLflow; UpdateCheck: answer signatures) and
``RunDeps``, the one bundle that ``RunManager`` holds and hands to every ``FederatedRun``.

Unit tests build a ``RunDeps`` of fakes (a fake clock makes every deadline instant)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from leukofed.protocol import RoundSummary, RunRecord
from services.aggregator.config import RunConfig
from services.aggregator.run_records import RunStore

Weights = dict[str, np.ndarray]


class Dispatcher(Protocol):
    def live_hospitals(self) -> set[str] | None: ...
    def submit(self, hospital: str, task: str, args: list[Any], expires: float) -> Any: ...
    def poll(self, handle: Any) -> tuple[bool, Any, str | None]: ...
    def discard(self, handle: Any) -> None: ...
    # Optional (leukofed.liveness): {hospital: time of its worker's last heartbeat, or None}.
    # def heartbeats(self, hospitals: list[str]) -> dict[str, float | None]: ...


class ModelOps(Protocol):
    def initial(self, cfg: RunConfig) -> tuple[Weights, set[str]]: ...
    def server_predictions(self, cfg: RunConfig, weights: Weights
                           ) -> tuple[np.ndarray, np.ndarray] | None: ...
    def server_audit(self, cfg: RunConfig, weights: Weights, stain_targets: Any,
                     original: np.ndarray | None = None) -> dict[str, float]: ...


class Tracker(Protocol):
    def start(self, record: RunRecord, cfg: RunConfig) -> str | None: ...
    def log_round(self, record: RunRecord, summary: RoundSummary) -> None: ...
    def register(self, record: RunRecord, cfg: RunConfig, summary: RoundSummary,
                 weights: Weights) -> str | None: ...
    def finish(self, record: RunRecord) -> None: ...


# Checks an answer's signature (leukofed.signing.UpdateVerifier); raises SignatureRejected.
# Called as (answer, hospital, run, round, kind=..., global_digest=..., task_id=...).
UpdateCheck = Callable[..., None]


@dataclass
class RunDeps:
    """The services a run uses. Read at each use (not copied), so a test may swap one."""

    store: RunStore
    dispatcher: Dispatcher
    model_ops: ModelOps
    tracker: Tracker | None = None
    verifier: UpdateCheck | None = None
    poll_interval_s: float = 0.25
    # Tasks out at once per step (0: all): each queued task holds the global weights in
    # Redis and each finished one an update, so this bounds Redis, not the round's size.
    max_in_flight: int = 64
    # Robust rules (median, Krum) and central DP hold every update of a round: refuse a
    # round whose updates would need more than this (MB).
    max_held_updates_mb: float = 2048.0
    liveness_check_s: float = 2.0  # how often pending hospitals' heartbeats are read
    # How long a hospital has to answer describe (its declaration, gather.py) before the
    # round goes on without counting it. Its first answer scans and hashes every image.
    describe_deadline_s: float = 120.0
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
