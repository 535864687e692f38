"""Fail closed: what a service must have before it starts, outside development mode.

Unsigned tasks, an aggregator API without a token or an inference service without an API
key and the aggregator's public key are acceptable only on a developer's machine. Each
service lists what it lacks (``startup_problems`` on its settings class); ``enforce``
refuses to start with one line naming all of it, unless ``LEUKOFED_DEV_MODE`` is on (the
local demo sets it; compose never does). A ``change-me`` placeholder left from
``.env.example`` is refused even in development mode: it is never what anyone meant.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

DEV_MODE_ENV = "LEUKOFED_DEV_MODE"
PLACEHOLDER = "change-me"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# Secrets any service may take from the environment outside its own settings.
SHARED_SECRETS = ("MLFLOW_TRACKING_PASSWORD",)


class StartupRefused(RuntimeError):
    """A service that must not start as configured; the message is one line."""


def dev_mode(environ: Mapping[str, str] | None = None) -> bool:
    value = (os.environ if environ is None else environ).get(DEV_MODE_ENV, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def is_loopback(url: str) -> bool:
    """A URL whose host is this machine (a local demo's broker), or a unix socket."""
    parts = urlsplit(url)
    return parts.scheme in ("unix", "redis+socket") or parts.hostname in LOOPBACK_HOSTS


def broker_problem(url: str | None) -> str | None:
    """Plain redis:// to another machine sends passwords and weights in clear."""
    if url and url.startswith("redis://") and not is_loopback(url):
        return "the broker URL is redis:// to another host (use rediss:// with TLS)"
    return None


def enforce(service: str, problems: Iterable[str | None],
            secrets: Mapping[str, str | None] | None = None,
            environ: Mapping[str, str] | None = None) -> list[str]:
    """Raise StartupRefused (one line) when a secret still holds the placeholder, or when
    anything is missing outside development mode. Returns what was waived in dev mode."""
    env = os.environ if environ is None else environ
    secrets = {**{name: env.get(name) for name in SHARED_SECRETS}, **(secrets or {})}
    placeholders = [name for name, value in secrets.items() if value and PLACEHOLDER in value]
    if placeholders:
        raise StartupRefused(
            f"{service}: refusing to start: {', '.join(placeholders)} still hold the "
            f"{PLACEHOLDER!r} placeholder from .env.example; set real secrets")
    missing = [p for p in problems if p]
    if not missing:
        return []
    if not dev_mode(env):
        raise StartupRefused(
            f"{service}: refusing to start without protection: {'; '.join(missing)}. "
            f"Configure them (docs/security.md), or set {DEV_MODE_ENV}=1 on a developer "
            "machine only")
    log.warning("%s: development mode (%s=1): starting without %s", service, DEV_MODE_ENV,
                "; ".join(missing))
    return missing


def allowed_hosts(configured: str) -> list[str]:
    """The Host headers an API answers (Starlette's TrustedHostMiddleware): the configured
    comma list; without one, any host in development mode, else this machine's names only
    (a DNS-rebinding page cannot then reach the API through a browser)."""
    hosts = [h.strip() for h in configured.split(",") if h.strip()]
    if hosts:
        return hosts
    return ["*"] if dev_mode() else ["localhost", "127.0.0.1"]
