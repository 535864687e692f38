"""One error body for every 4xx and 5xx of both APIs: ``{"error": "<one line>"}``.

It is the Open Inference Protocol's shape, so the inference service's V2 routes and its v1
routes, the aggregator's API and the middlewares that answer before any route (413 body
limit, 429 rate limit) all say errors the same way. FastAPI's own validation errors (a list
under ``detail``) become one line naming each bad field. Nothing of a stack trace ever
reaches a client: an unexpected exception is logged and answered 500 with a fixed message.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)


def error_body(message: str, **extra: Any) -> dict[str, Any]:
    return {"error": message, **extra}


def error_bytes(message: str, **extra: Any) -> bytes:
    """The body for raw ASGI answers (middlewares that reply before any route)."""
    return json.dumps(error_body(message, **extra)).encode()


def error_response(status: int, message: str, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    return JSONResponse(error_body(message), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", ""))
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    """Answer HTTPException, request validation and unexpected errors in the one shape."""

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _validation_message(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error (logged by the service)")
