"""Durable run records and per-round checkpoints on the aggregator's disk.

Layout: ``<state_dir>/runs/<run_id>/run.json`` plus ``round-<n>.weights`` and
``round-<n>.strategy`` (both in the weight wire format, so no pickle on disk either). A
round's checkpoint files are written first and ``run.json`` (with ``completed_round = n``) is
replaced atomically last: that rename is the commit point, so a crash at any moment leaves
either the old or the new round, never half of one.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from leukofed.protocol import RunRecord
from leukofed.wire import decode_weights, encode_weights

ACTIVE = ("queued", "running")
FINAL = ("completed", "failed", "cancelled")
MAX_EVENTS = 500
KEEP_CHECKPOINTS = 2


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def state_to_arrays(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Strategy state (arrays and scalars) as named arrays for the wire format."""
    return {k: np.asarray(v) for k, v in state.items()}


class RunStore:
    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir) / "runs"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()

    def dir(self, run_id: str) -> Path:
        return self.root / run_id

    def create(self, config: dict[str, object]) -> RunRecord:
        now = time.time()
        record: RunRecord = {
                  "id": new_run_id(), "config": config, "status": "queued", "reason": None,
                  "created": now, "updated": now, "current_round": 0, "completed_round": 0,
                  "registered_round": 0, "rounds": [], "versions": {}, "mlflow_run_id": None,
                  "rng_state": None, "events": [], "cancel_requested": False}
        self.dir(record["id"]).mkdir(parents=True)
        self.save(record)
        return record

    def save(self, record: RunRecord) -> None:
        with self._lock:
            record["updated"] = time.time()
            record["events"] = record["events"][-MAX_EVENTS:]
            _atomic_write(self.dir(record["id"]) / "run.json",
                          json.dumps(record, default=_json_default).encode())

    def load(self, run_id: str) -> RunRecord | None:
        path = self.dir(run_id) / "run.json"
        if not path.is_file():
            return None
        with self._lock:
            return json.loads(path.read_text())

    def list(self) -> list[RunRecord]:
        records = [self.load(p.name) for p in sorted(self.root.iterdir()) if p.is_dir()]
        return [r for r in records if r is not None]

    def event(self, record: RunRecord, message: str, **fields: Any) -> None:
        record["events"].append({"time": time.time(), "message": message, **fields})
        if "rejected" in fields and "hospital" in fields:
            # Counted apart from the events, which are capped: a counter never goes down.
            reason = str(fields["rejected"]).split(":")[0]
            counts = record.setdefault("rejections", {}).setdefault(str(fields["hospital"]), {})
            counts[reason] = counts.get(reason, 0) + 1

    # ------------------------------------------------------------ checkpoints

    def write_checkpoint(self, record: RunRecord, round_no: int,
                         weights: Mapping[str, np.ndarray], strategy_state: Mapping[str, Any],
                         rng_state: dict[str, object]) -> None:
        d = self.dir(record["id"])
        _atomic_write(d / f"round-{round_no:04d}.weights", encode_weights(weights))
        _atomic_write(d / f"round-{round_no:04d}.strategy",
                      encode_weights(state_to_arrays(strategy_state)))
        record["completed_round"] = round_no
        record["rng_state"] = rng_state
        self.save(record)  # the commit point
        for old in sorted(d.glob("round-*.weights"))[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)
            old.with_suffix(".strategy").unlink(missing_ok=True)

    def read_checkpoint(self, record: RunRecord
                        ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
        n = record["completed_round"]
        if not n:
            return None
        d = self.dir(record["id"])
        weights = decode_weights((d / f"round-{n:04d}.weights").read_bytes())
        state = decode_weights((d / f"round-{n:04d}.strategy").read_bytes())
        return weights, state


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
