"""The signed tasks this hospital has completed, on disk: a replayed task is refused after a
restart too, while a task the worker never finished still runs when Celery delivers it again.

Why record at completion and not at receipt (issue 26, finding 11): tasks are acknowledged
late (``task_acks_late``), so a worker that dies mid-training gets the same message, with the
same signature and nonce, again after its restart. A nonce stored when the task *arrives*
would make that restarted worker refuse its own unfinished work; a nonce stored when the task
*completes* refuses only what already ran. The in-memory cache of leukofed.signing still
refuses a second delivery while the first is running in the same process.

Only nonces of tasks whose aggregator signature verified are stored (nobody else can grow the
file), and only for as long as such a task is valid: a row older than the task validity plus
a margin for clock skew is pruned, because a task that old is refused as expired anyway.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

FILE_NAME = "completed_tasks.sqlite"
CLOCK_SKEW_S = 3600.0  # kept this much longer than the validity, for clocks that disagree


class CompletedTasks:
    """Nonces of completed signed tasks, in ``<state_dir>/completed_tasks.sqlite``."""

    def __init__(self, state_dir: str | Path, valid_s: float) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self.keep_s = float(valid_s) + CLOCK_SKEW_S
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """One connection per call, committed (or rolled back) and closed at the end."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30)
            try:
                with db:
                    db.execute("CREATE TABLE IF NOT EXISTS completed (nonce TEXT PRIMARY KEY, "
                               "signed_at REAL NOT NULL, completed_at REAL NOT NULL)")
                    yield db
            finally:
                db.close()

    def completed(self, nonce: str) -> bool:
        """True when a task with this nonce ran to its answer here before."""
        with self._db() as db:
            row = db.execute("SELECT 1 FROM completed WHERE nonce = ?", (nonce,)).fetchone()
        return row is not None

    def record(self, nonce: str, signed_at: float, now: float | None = None) -> None:
        """Remember a completed task (committed before it returns); prune expired rows."""
        now = time.time() if now is None else now
        with self._db() as db:
            db.execute("INSERT OR IGNORE INTO completed VALUES (?, ?, ?)",
                       (nonce, float(signed_at), now))
            db.execute("DELETE FROM completed WHERE signed_at < ?", (now - self.keep_s,))

    def __len__(self) -> int:
        with self._db() as db:
            return int(db.execute("SELECT COUNT(*) FROM completed").fetchone()[0])
