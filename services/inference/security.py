"""The API key: enforced on the model routes only when one is configured."""

from __future__ import annotations

import secrets

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader

HEADER = "X-API-Key"
_scheme = APIKeyHeader(name=HEADER, auto_error=False,
                       description="Required when LEUKOFED_INFERENCE_API_KEY is set")


async def require_api_key(request: Request, key: str | None = Depends(_scheme)) -> None:
    expected = request.app.state.service.settings.api_key
    if expected is None:
        return
    # As bytes: compare_digest refuses a str with non-ASCII characters (a 500, not a 401).
    if key is None or not secrets.compare_digest(key.encode("utf-8", "surrogateescape"),
                                                 expected.get_secret_value().encode()):
        raise HTTPException(401, f"missing or wrong {HEADER} header",
                            headers={"WWW-Authenticate": HEADER})
