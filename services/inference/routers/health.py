"""Liveness, readiness (with the reason when not ready) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse

from ..state import ServiceState, get_state

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict:
    return {"live": True}


@router.get("/readyz", summary="A model is loaded; otherwise 503 with the reason")
async def readyz(state: ServiceState = Depends(get_state)) -> JSONResponse:
    src = state.source
    body = {"ready": src.ready, "status": src.status, "last_error": src.last_error,
            "refused_versions": src.refused}
    if src.current is not None:
        body["model"] = state.model_ref(src.current)
    return JSONResponse(body, status_code=200 if src.ready else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(state: ServiceState = Depends(get_state)) -> Response:
    data, content_type = state.metrics.render()
    return Response(data, media_type=content_type)
