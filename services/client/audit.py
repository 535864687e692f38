"""What a hospital's IT can see and control locally: the participation log and the pause flag.

The log is append-only JSON lines, one per task answered (run, round, task, bytes, SHA-256 of
exactly the bytes sent, time, status), so hospital IT can check every update that left and
compare hashes with the aggregator's records. The pause switch is a file, so it works while
the worker runs and survives restarts: a paused worker declines every task.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOG_NAME = "participation.jsonl"
PAUSE_NAME = "PAUSED"


class ParticipationLog:
    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / LOG_NAME

    def append(self, **entry: Any) -> dict[str, Any]:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(entry, sort_keys=True) + "\n"
        # One write call in append mode: concurrent writers never interleave within a line.
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return entry

    def entries(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    yield json.loads(line)


class PauseSwitch:
    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / PAUSE_NAME

    @property
    def paused(self) -> bool:
        return self.path.exists()

    def reason(self) -> str | None:
        return self.path.read_text().strip() or "paused" if self.paused else None

    def pause(self, reason: str = "") -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(reason or f"paused at {time.strftime('%Y-%m-%dT%H:%M:%SZ')}")

    def resume(self) -> None:
        self.path.unlink(missing_ok=True)
