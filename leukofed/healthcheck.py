"""Container health checks that need nothing but the standard library (no curl in the images).

    python -m leukofed.healthcheck http URL      # 2xx from URL
    python -m leukofed.healthcheck broker [URL]  # an ESTABLISHED TCP connection to the broker

Why ``broker`` for the hospital worker: its solo pool trains in the worker process, so a
Celery ping goes unanswered for the whole of a local epoch and would mark a healthy,
busy worker unhealthy. A live worker always holds its broker connection open, so the kernel's
socket table (``/proc/net/tcp``, no import of Celery or TensorFlow) tells the truth cheaply.
The URL defaults to $LEUKOFED_CLIENT_BROKER_URL.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

ESTABLISHED = "01"


def check_http(url: str, timeout: float = 4.0) -> str | None:
    """None when the URL answers 2xx, else the reason."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (own URL)
            return None if 200 <= response.status < 300 else f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {exc}"


def _broker_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


def established_ports(proc_net: Path = Path("/proc/net")) -> set[int]:
    """Remote ports of this network namespace's established TCP connections."""
    ports = set()
    for name in ("tcp", "tcp6"):
        path = proc_net / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[3] == ESTABLISHED:
                ports.add(int(fields[2].rsplit(":", 1)[1], 16))
    return ports


def check_broker(url: str) -> str | None:
    host, port = _broker_port(url)
    if port in established_ports():
        return None
    # No connection: say whether the broker itself is reachable, to point at the culprit.
    try:
        socket.create_connection((host, port), timeout=3).close()
        return f"no open connection to the broker {host}:{port} (worker not connected)"
    except OSError as exc:
        return f"broker {host}:{port} unreachable: {exc}"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["http"] and len(args) == 2:
        problem = check_http(args[1])
    elif args[:1] == ["broker"] and len(args) <= 2:
        url = args[1] if len(args) == 2 else os.environ.get("LEUKOFED_CLIENT_BROKER_URL", "")
        problem = check_broker(url or "redis://127.0.0.1:6379/0")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
