"""Admin-token auth for the aggregator's API (runs, hospitals).

The token comes from ``LEUKOFED_AGGREGATOR_ADMIN_TOKEN`` or, better in containers, a file
named by ``LEUKOFED_AGGREGATOR_ADMIN_TOKEN_FILE`` (a Docker/Kubernetes secret); it is held as
a SecretStr so it never appears in a repr or a log line. Clients send
``Authorization: Bearer <token>``. No header: 401 (with ``WWW-Authenticate``, so a client
knows to authenticate); a wrong token: 403. The comparison is constant-time so the token
cannot be guessed byte by byte from response times. Without a configured token the API is
open, as before (a single-machine demo); docs/security.md says when that is acceptable.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import HTTPException, Request

log = logging.getLogger(__name__)


def read_secret(value: str | None, file: str | None) -> str | None:
    """A secret from a file (whitespace trimmed) or the value itself; the file wins."""
    if file:
        with open(file, encoding="utf-8") as f:
            secret = f.read().strip()
        if not secret:
            raise ValueError(f"secret file {file} is empty")
        return secret
    return value or None


def require_admin(request: Request) -> None:
    """FastAPI dependency: 401 without a bearer token, 403 with a wrong one."""
    expected: str | None = getattr(request.app.state, "admin_token", None)
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(401, "admin token required", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        # the client's address only: never the token it sent
        log.warning("rejected admin token from %s", request.client.host if request.client
                    else "?")
        raise HTTPException(403, "invalid admin token")
