"""GET /v1/model: what is being served, by which runtime, from which ONNX file; whether it
is calibrated and has a model card. GET /v1/model/card: that card (Markdown, HTML, JSON)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from leukofed.export import INPUT_NAME, OUTPUT_NAME

from ..schemas import ModelInfo
from ..security import require_api_key
from ..state import ServiceState, get_state
from .predict import served_or_503

router = APIRouter(prefix="/v1", tags=["model"], dependencies=[Depends(require_api_key)])

CARD_PATH = "/v1/model/card"
# The card page is static HTML with one inline <style> and no script: it gets a policy that
# allows exactly that (the service's page policy forbids inline styles).
CARD_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'")


@router.get("/model", response_model=ModelInfo)
async def model_info(state: ServiceState = Depends(get_state)) -> dict:
    m = served_or_503(state)
    size = m.image_size
    cal, card = m.calibration, m.card
    return {
        "name": m.name, "version": m.version, "alias": state.source.alias_of(m),
        "classes": m.classes,
        "architecture": m.metadata.get("architecture"),
        "input": {"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, size, size, 3]},
        "output": {"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, len(m.classes)]},
        "image_size": size, "preprocessing": m.metadata.get("preprocessing", {}),
        "provider": m.providers[0], "providers": m.providers, "onnx_sha256": m.sha256,
        "onnx_origin": m.onnx_origin, "parity_max_abs_diff": m.parity_max_abs_diff,
        "signature": m.signature,
        "loaded_at": m.loaded_at.isoformat(), "run_id": m.run_id,
        "max_batch_size": state.settings.max_batch_size,
        "max_queue_delay_ms": state.settings.max_queue_delay_ms,
        "ood_check": ("available" if m.profile is not None
                      else f"unavailable: {m.profile_note}"),
        "calibration": (
            {"available": True, "temperature": cal.temperature, "coverage": cal.coverage,
             "quantiles": dict(zip(m.classes, cal.quantiles)), "note": None}
            if cal is not None else {"available": False, "note": m.calibration_note}),
        "card": ({"available": True, "url": CARD_PATH, "summary": card.summary, "note": None}
                 if card is not None else {"available": False, "note": m.card_note}),
    }


@router.get(
    "/model/card", summary="The served version's model card",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/markdown": {}, "text/html": {},
                                 "application/json": {}}},
               404: {"description": "The served version carries no model card"}})
async def model_card(request: Request,
                     format: Literal["md", "markdown", "html", "json"] | None = Query(
                         None, description="md (default), html or json; without it, an "
                                           "Accept header that prefers text/html gets HTML"),
                     state: ServiceState = Depends(get_state)) -> Response:
    m = served_or_503(state)
    headers = {"X-Model-Name": m.name, "X-Model-Version": m.version}
    if m.card is None:
        return JSONResponse({"error": f"model {m.name!r} version {m.version} has no model "
                                       f"card: {m.card_note}"},
                            status_code=404, headers=headers)
    if format is None:
        accept = request.headers.get("accept", "")
        format = "html" if "text/html" in accept else "md"
    if format == "json":
        return JSONResponse(m.card.data, headers=headers)
    if format == "html":
        return HTMLResponse(m.card.html,
                            headers={**headers, "Content-Security-Policy": CARD_CSP})
    return PlainTextResponse(m.card.markdown, media_type="text/markdown; charset=utf-8",
                             headers=headers)
