"""Per-client rate limiting and security headers: pure ASGI middleware for the inference app.

Rate limiting: one token bucket per client IP (``scope["client"]``; behind a reverse proxy,
run uvicorn with ``--proxy-headers --forwarded-allow-ips`` so that is the real client and not
the proxy). A request costs one token; a bucket holds ``burst`` tokens and refills at
``rate_per_s``. An empty bucket is answered 429 with a JSON message and ``Retry-After``
before the request body is read, so a flood costs neither decoding nor inference. Health
probes and metrics are never limited: an orchestrator that gets 429 on /healthz would
restart a healthy service.

Security headers go on every response (page, static files, API, errors): the page is
served only from this origin (no CDN, hospital networks are often offline), so the
Content-Security-Policy allows only 'self', plus ``data:`` and ``blob:`` images because the
heat map arrives as a base64 PNG and the uploaded photo is shown from an object URL. The
app's JS sets bar widths through the CSSOM (``el.style.width``), which CSP permits without
'unsafe-inline'. FastAPI's own /docs and /redoc load Swagger UI / ReDoc from a CDN with an
inline bootstrap script, so they get a policy that allows exactly that and nothing more.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from leukofed.http_errors import error_bytes

PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; "
            "img-src 'self' data: blob:; connect-src 'self'; font-src 'self'; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# Swagger UI and ReDoc as FastAPI serves them: assets from jsdelivr, one inline script,
# ReDoc's Google font and FastAPI's favicon.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net "
            "https://fonts.googleapis.com; font-src 'self' https://fonts.gstatic.com; "
            "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; "
            "worker-src 'self' blob:; connect-src 'self'; object-src 'none'; "
            "base-uri 'none'; frame-ancestors 'none'")
DOCS_PATHS = ("/docs", "/redoc")
BASE_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def security_headers(path: str) -> list[tuple[bytes, bytes]]:
    csp = DOCS_CSP if path.startswith(DOCS_PATHS) else PAGE_CSP
    return [(k.encode(), v.encode())
            for k, v in {**BASE_HEADERS, "content-security-policy": csp}.items()]


class SecurityHeadersMiddleware:
    """Adds the headers to every HTTP response; a header a route set itself is kept."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = security_headers(scope.get("path", ""))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in extra if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class TokenBuckets:
    """Token buckets keyed by client. Not thread-safe and need not be: the middleware runs
    on the event loop and take() never awaits."""

    def __init__(self, rate_per_s: float, burst: int, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)

    def take(self, client: str) -> float:
        """Consume a token: 0.0 if allowed, else the seconds until one is available."""
        now = self.clock()
        tokens, at = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            self._prune(now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        # Bounded memory under many source addresses: forget clients whose bucket has
        # refilled completely; they are indistinguishable from new ones.
        if len(self._buckets) <= self.max_clients:
            return
        full_after = self.burst / self.rate
        self._buckets = {c: v for c, v in self._buckets.items() if now - v[1] < full_after}

    def __len__(self) -> int:
        return len(self._buckets)


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, rate_per_s: float, burst: int) -> None:
        self.app = app
        self.buckets = TokenBuckets(rate_per_s, burst)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.buckets.take(client)
        if wait <= 0:
            await self.app(scope, receive, send)
            return
        retry_after = max(1, math.ceil(wait))
        message = (f"rate limit exceeded: at most {self.buckets.rate:g} requests/s per client "
                   f"(bursts of {self.buckets.burst:g}); retry after {retry_after} s "
                   "(LEUKOFED_INFERENCE_RATE_LIMIT_PER_S, LEUKOFED_INFERENCE_RATE_LIMIT_BURST)")
        body = error_bytes(message, retry_after_s=retry_after)
        await send({"type": "http.response.start", "status": 429,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(retry_after).encode())]})
        await send({"type": "http.response.body", "body": body})
