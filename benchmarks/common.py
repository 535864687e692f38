"""What every benchmark records next to its numbers: machine, versions, date, command."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shlex
import sys
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for mod in ("tensorflow", "keras", "onnxruntime", "tf2onnx", "numpy"):
        with contextlib.suppress(ImportError, AttributeError):
            versions[mod] = __import__(mod).__version__
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "versions": versions}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def header(command: str | None = None) -> dict[str, Any]:
    return {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": command or " ".join(shlex.quote(a) for a in sys.argv),
            "machine": machine()}


def write_json(path: str | Path, doc: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1, default=float))
