"""The aggregator's FastAPI app: ``uvicorn services.aggregator.app:create_app --factory``.

The lifespan builds the Celery dispatcher, the Keras and MLflow helpers and the run manager,
resumes unfinished runs from their last completed round, and on shutdown leaves the running
run resumable (its status stays 'running')."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from celery import Celery
from fastapi import Depends, FastAPI, Response
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from leukofed import http_errors, signing, startup
from leukofed.logging import add_filter
from leukofed.logging import configure as configure_logging
from leukofed.transport import make_celery
from registry.client import Registry
from services.aggregator.auth import read_secret, require_admin
from services.aggregator.broker_guard import BrokerGuard
from services.aggregator.deps import RunDeps
from services.aggregator.dispatch import CeleryDispatcher
from services.aggregator.keras_ops import KerasModelOps
from services.aggregator.manager import RunManager
from services.aggregator.observability import AggregatorMetrics, RunContextFilter
from services.aggregator.promotion import Promoter, PromotionWatcher
from services.aggregator.routers import hospitals, promotions, runs
from services.aggregator.run_records import RunStore
from services.aggregator.settings import AggregatorSettings
from services.aggregator.tracking import MlflowTracker


def create_app(settings: AggregatorSettings | None = None, manager: RunManager | None = None
               ) -> FastAPI:
    settings = settings or AggregatorSettings()
    configure_logging("aggregator")  # JSON lines (leukofed.logging)
    # The token is read once at startup, from env or a secret file, and kept off the settings
    # object's repr (SecretStr); routers other than /healthz and /metrics require it.
    admin_token = read_secret(
        settings.admin_token.get_secret_value() if settings.admin_token else None,
        str(settings.admin_token_file) if settings.admin_token_file else None)
    startup.enforce("aggregator", settings.startup_problems(admin_token),
                    settings.startup_secrets(admin_token))
    # Hospital liveness on /metrics (open to probes) is cached: a scrape storm is no ping
    # storm (issue 26, finding 11).
    metrics = AggregatorMetrics(settings.state_dir,
                                liveness_max_age_s=settings.metrics_liveness_max_age_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = RunStore(settings.state_dir)
        def celery_app(hospital: str | None = None) -> Celery:
            # hospital given: isolated mode, this hospital's key prefix (see dispatch.py)
            name = "leukofed-aggregator" + (f"-{hospital}" if hospital else "")
            return make_celery(name, settings.broker_url, settings.result_backend,
                               settings.visibility_timeout_s, hospital_id=hospital,
                               isolate=hospital is not None, tls=settings.tls)

        signing_key = (signing.load_private_key(settings.signing_key_file)
                       if settings.signing_key_file else None)
        if settings.isolated:
            dispatcher = CeleryDispatcher(None, settings.ping_timeout_s, signing_key,
                                          hospital_app=celery_app,
                                          hospitals=settings.isolated)
        else:
            dispatcher = CeleryDispatcher(celery_app(), settings.ping_timeout_s, signing_key)
        verifier = (signing.UpdateVerifier(signing.load_public_keys(settings.hospital_keys_dir))
                    if settings.hospital_keys_dir else None)
        model_ops = KerasModelOps(settings)
        tracker = (MlflowTracker(Registry(settings.tracking_uri, settings.model_name),
                                 settings.mlflow_experiment, model_ops, signing_key)
                   if settings.tracking else None)
        mgr = manager or RunManager(RunDeps(
            store, dispatcher, model_ops, tracker, verifier, settings.poll_interval_s,
            max_in_flight=settings.max_in_flight,
            max_held_updates_mb=settings.max_held_updates_mb,
            describe_deadline_s=settings.describe_deadline_s))
        app.state.store = mgr.store
        app.state.dispatcher = mgr.dispatcher
        app.state.manager = mgr
        metrics.collector.live_hospitals = mgr.dispatcher.live_hospitals
        metrics.collector.progress = mgr.progress
        metrics.collector.last_seen = lambda: dict(getattr(mgr.dispatcher, "last_seen", {}))
        guard = _broker_guard(settings)
        if guard is not None:  # per-hospital limits and the memory alarm (issue 26, finding 9)
            metrics.registry.register(guard)  # type: ignore[arg-type]
        add_filter(RunContextFilter(mgr))  # run_id and round on the round loop's lines
        app.state.mlflow_url = lambda rec: _mlflow_url(settings, rec)
        watcher = None
        if settings.tracking and signing_key is not None:
            app.state.promoter = Promoter(Registry(settings.tracking_uri, settings.model_name),
                                          signing_key, settings.state_dir,
                                          settings.approval_ttl_s)
            aliases = [a.strip() for a in settings.promotion_aliases.split(",") if a.strip()]
            if aliases:
                watcher = PromotionWatcher(app.state.promoter, aliases,
                                           settings.promotion_watch_s)
                watcher.start()
        mgr.start(resume=settings.resume_on_start)
        yield
        mgr.stop()
        if guard is not None:
            guard.stop()
            metrics.registry.unregister(guard)  # type: ignore[arg-type]
        if watcher is not None:
            watcher.stop()

    app = FastAPI(title="leukofed aggregator", version="1",
                  description="Start and follow federated training runs over the hospitals' "
                              "Celery workers.", lifespan=lifespan)
    http_errors.install(app)  # {"error": ...} for every 4xx/5xx (leukofed.http_errors)
    app.state.admin_token = admin_token
    # A request for another Host (DNS rebinding from a browser) gets 400 before anything.
    app.add_middleware(TrustedHostMiddleware,
                       allowed_hosts=startup.allowed_hosts(settings.allowed_hosts))
    admin = [Depends(require_admin)]
    app.include_router(runs.router, dependencies=admin)
    app.include_router(hospitals.router, dependencies=admin)
    app.include_router(promotions.router, dependencies=admin)
    app.state.promoter = None  # set by the lifespan when the aggregator can sign

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics")
    async def prometheus_metrics() -> Response:
        # A scrape may ping the workers (up to ping_timeout_s, at most once per
        # metrics_liveness_max_age_s): keep it off the event loop.
        body, content_type = await run_in_threadpool(metrics.render)
        return Response(body, media_type=content_type)

    return app


def _broker_guard(settings: AggregatorSettings) -> BrokerGuard | None:
    """The broker guard, started, in isolated mode with a quota (else None): it connects as
    the aggregator's own broker user, which already reaches every hospital's prefix."""
    if not settings.isolated or settings.broker_quota_mb <= 0:
        return None
    import redis

    client = redis.Redis.from_url(settings.broker_url, socket_timeout=30,
                                  **(settings.tls or {}))
    return BrokerGuard(client, settings.isolated, int(settings.broker_quota_mb * 2**20),
                       settings.broker_guard_interval_s).start()


def _mlflow_url(settings: AggregatorSettings, record: dict[str, Any]) -> str | None:
    uri = settings.tracking_uri
    if not settings.tracking or not uri.startswith("http") or not record.get("mlflow_run_id"):
        return None
    exp = record.get("mlflow_experiment_id") or "0"
    return f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{record['mlflow_run_id']}"
