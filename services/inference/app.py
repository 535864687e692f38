"""The FastAPI app factory. ``create_app()`` reads settings from the environment.

Start-up never waits for a model: the watcher loads one in the background, /readyz says
why the service is not ready until it has, and the service follows the alias after that.
A configuration that demands CUDA when none works stops start-up (fails loudly).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

import leukofed
from leukofed import http_errors, startup

from . import runtime
from .batcher import MicroBatcher
from .decode_budget import DecodeBudget
from .http_guards import RateLimitMiddleware, SecurityHeadersMiddleware
from .imaging import InputError
from .limits import BodyLimitMiddleware
from .metrics import Metrics, MetricsMiddleware
from .model_source import ModelSource
from .routers import health, model, page, predict, v2
from .settings import InferenceSettings
from .state import ServiceState

log = logging.getLogger("leukofed.inference")


def create_app(settings: InferenceSettings | None = None,
               source: ModelSource | None = None) -> FastAPI:
    """Build the app; ``source`` replaces the MLflow-backed model source (unit tests)."""
    settings = settings or InferenceSettings()
    startup.enforce("inference", settings.startup_problems(), settings.startup_secrets())
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        providers = runtime.probe_provider(settings.provider, settings.threads)
        log.info("onnxruntime providers for provider=%s: %s", settings.provider, providers)
        src = source or ModelSource(settings)
        src.on_swap.append(metrics.model_swapped)
        batcher = MicroBatcher(lambda: src.current, settings.max_batch_size,
                               settings.max_queue_delay_ms, on_batch=metrics.observe_batch)
        decode = DecodeBudget(settings.decode_memory_bytes, settings.decode_wait_s)
        app.state.service = ServiceState(settings, src, batcher, metrics, decode)
        batcher.start()
        watcher = asyncio.create_task(src.watch(), name="model-watcher")
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await batcher.stop()

    app = FastAPI(
        title="leukofed inference",
        version=leukofed.__version__,
        description="Blood-smear classification (Benign, Early Pre-B, Pre-B, Pro-B) for "
                    "decision support by qualified professionals; not a diagnosis.",
        lifespan=lifespan,
    )

    http_errors.install(app)  # {"error": ...} for every 4xx/5xx (leukofed.http_errors)

    @app.exception_handler(InputError)
    async def input_error(_: Request, exc: InputError) -> JSONResponse:
        return http_errors.error_response(exc.status, exc.message)

    app.add_exception_handler(v2.V2Error, v2.v2_error_response)
    for router in (predict.router, model.router, health.router, v2.router, v2.models,
                   page.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=page.STATIC_DIR), name="static")
    # The last added runs first: metrics see every answer (429s included), the headers go
    # on every response (413/429 too), and a limited client is refused before its body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    if settings.rate_limit_per_s > 0:
        app.add_middleware(RateLimitMiddleware, rate_per_s=settings.rate_limit_per_s,
                           burst=settings.rate_limit_burst)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    # Outermost: a request for another Host (DNS rebinding) gets 400 before anything else.
    app.add_middleware(TrustedHostMiddleware,
                       allowed_hosts=startup.allowed_hosts(settings.allowed_hosts))
    return app
