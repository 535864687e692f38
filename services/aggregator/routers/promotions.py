"""/v1/promotions: promote a version (the release gate, then the signed approval) and read
the promotion log (``services/aggregator/promotion.py``). Admin token required."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from leukofed.gate import GateFloors, check_gate
from registry.client import RegistryError
from services.aggregator.promotion import PromotionRefused, read_card

router = APIRouter(prefix="/v1/promotions", tags=["promotions"])


class PromotionRequest(BaseModel):
    version: str = Field(min_length=1, max_length=20, pattern=r"^[0-9]+$")
    alias: str = Field("champion", min_length=1, max_length=100)
    model: str | None = Field(None, max_length=200, description="the registered model the "
                              "caller means (refused when it is not the aggregator's)")
    by: str = Field("", max_length=200, description="who asked (the MLflow user)")
    force: bool = False
    reason: str | None = Field(None, max_length=2000)
    floors: dict[str, float | None] | None = None


def _promoter(request: Request) -> Any:
    promoter = request.app.state.promoter
    if promoter is None:
        raise HTTPException(503, "this aggregator signs no approvals (no signing key, or "
                                 "tracking off): promotions cannot be approved here")
    return promoter


@router.get("", summary="The promotion log, oldest first, and whether it is intact")
async def history(request: Request) -> dict[str, Any]:
    promoter = _promoter(request)
    entries = await run_in_threadpool(promoter.log.entries)
    broken = await run_in_threadpool(promoter.log.verify)
    return {"model": promoter.model, "entries": entries, "intact": broken is None,
            "broken": broken}


@router.post("", summary="Promote a version: the release gate, then the signed approval")
async def promote(body: PromotionRequest, request: Request) -> dict[str, Any]:
    promoter = _promoter(request)
    if body.model is not None and body.model != promoter.model:
        raise HTTPException(409, f"this aggregator promotes {promoter.model!r}, not "
                                 f"{body.model!r}")
    if body.force and not (body.reason or "").strip():
        raise HTTPException(422, "force needs a reason (recorded with the move)")
    try:  # the caller's floors (leukofed promote --min-...), else the aggregator's
        floors = GateFloors(**body.floors) if body.floors else None
    except ValidationError as exc:
        raise HTTPException(422, f"release gate floors: {exc.errors()[:3]}") from None

    def run() -> dict[str, Any]:
        info = promoter.registry.version(body.version)
        verdict = check_gate(read_card(promoter.registry, info.tags), info.tags,
                             floors or promoter.floors())
        if not verdict.passed and not body.force:
            raise HTTPException(409, f"version {body.version} fails the release gate: "
                                     f"{verdict.summary()}")
        gate: dict[str, Any] = {"gate": "passed" if verdict.passed else "overridden"}
        if body.reason:
            gate["reason"] = body.reason
        if not verdict.passed:
            gate["failed"] = [c.describe() for c in verdict.failed]
        by = (body.by or "admin") + " (aggregator admin token)"
        return promoter.promote(body.version, body.alias, by, gate)

    try:
        return await run_in_threadpool(run)
    except PromotionRefused as exc:
        raise HTTPException(409, str(exc)) from None
    except RegistryError as exc:
        raise HTTPException(404 if exc.missing else 502, str(exc)) from None
