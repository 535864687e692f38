"""One logging setup for every service: JSON lines on stderr, with run, round and hospital ids.

Why JSON lines: the aggregator, each hospital's worker and the inference service write to
different files (or container logs); a log shipper (Loki, Elasticsearch, ``jq``) can then
follow one federated run across all of them by ``run_id`` and ``round`` without parsing
free text. ``LEUKOFED_LOG_FORMAT=text`` switches to a human format for a terminal.

Ids reach a record three ways, later ones winning:

* process-wide fields set once at startup (``configure(service=..., hospital=...)``);
* the current context (``log_context(run_id=..., round=...)``), a ``contextvars`` scope, so
  the aggregator's round thread and a worker's task tag every line they log, including lines
  from libraries that know nothing about runs;
* ``extra={...}`` on one call.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

FORMAT_ENV = "LEUKOFED_LOG_FORMAT"
LEVEL_ENV = "LEUKOFED_LOG_LEVEL"
CONTEXT_KEYS = ("service", "run_id", "round", "hospital")

_static: dict[str, Any] = {}
_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "leukofed_log_context", default=None)
# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def current_context() -> dict[str, Any]:
    """The ids that the next log line will carry (process-wide, then contextual)."""
    return {**_static, **(_context.get() or {})}


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Tag every line logged inside the block (this thread or task) with ``fields``."""
    fields = {k: v for k, v in fields.items() if v not in (None, "")}
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def set_context(**fields: Any) -> None:
    """Set contextual ids without a block (the rest of this thread or task)."""
    fields = {k: v for k, v in fields.items() if v not in (None, "")}
    _context.set({**(_context.get() or {}), **fields})


class ContextFilter(logging.Filter):
    """Copies the current ids onto each record, so any formatter can use them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in current_context().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, ids, extras."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic one-line format, followed by whatever ids are set."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(f"{k}={getattr(record, k)}" for k in CONTEXT_KEYS
                       if k != "service" and getattr(record, k, None) not in (None, ""))
        return f"{line} [{ids}]" if ids else line


def configure(service: str, level: str | int | None = None, fmt: str | None = None,
              **static: Any) -> None:
    """Send every logger's records to one stderr handler (JSON unless LEUKOFED_LOG_FORMAT=text).

    Idempotent: a second call replaces the handler rather than adding one. uvicorn's and
    Celery's own handlers are removed so their lines go through ours too.
    """
    _static.clear()
    _static.update({k: v for k, v in {"service": service, **static}.items()
                    if v not in (None, "")})
    fmt = (fmt or os.environ.get(FORMAT_ENV) or "json").lower()
    level = level or os.environ.get(LEVEL_ENV) or "INFO"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
    handler.addFilter(ContextFilter())
    handler._leukofed = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in list(root.handlers):
        # Exactly StreamHandler: what basicConfig adds; test-capture handlers are subclasses.
        if getattr(old, "_leukofed", False) or type(old) is logging.StreamHandler:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True


def add_filter(log_filter: logging.Filter) -> None:
    """Add a filter to the handler installed by ``configure`` (it sees every record)."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_leukofed", False):
            handler.addFilter(log_filter)


_celery_hooked = False


def install_celery_logging(service: str, **static: Any) -> None:
    """JSON logging for a Celery worker, with each task's run id and round as context.

    Connecting ``setup_logging`` stops Celery from installing its own text handlers; the
    task signals read the round config (the task argument that has a ``run_id``) so every
    line a task logs, TensorFlow's included, carries the run and round it belongs to.
    """
    global _celery_hooked
    configure(service, **static)
    if _celery_hooked:
        return
    from celery import signals

    def _setup(loglevel: int | str | None = None, **_: Any) -> None:
        configure(service, level=loglevel or None, **static)

    def _prerun(args: Any = None, kwargs: Any = None, **_: Any) -> None:
        for value in [*(args or ()), *((kwargs or {}).values())]:
            if isinstance(value, dict) and "run_id" in value:
                set_context(run_id=value.get("run_id"), round=value.get("round"))
                return

    def _postrun(**_: Any) -> None:
        _context.set(None)

    signals.setup_logging.connect(_setup, weak=False)
    signals.task_prerun.connect(_prerun, weak=False)
    signals.task_postrun.connect(_postrun, weak=False)
    _celery_hooked = True
