"""GET /v1/model: what is being served, by which runtime, from which ONNX file."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from leukofed.export import INPUT_NAME, OUTPUT_NAME

from ..schemas import ModelInfo
from ..security import require_api_key
from ..state import ServiceState, get_state
from .predict import served_or_503

router = APIRouter(prefix="/v1", tags=["model"], dependencies=[Depends(require_api_key)])


@router.get("/model", response_model=ModelInfo)
async def model_info(state: ServiceState = Depends(get_state)) -> dict:
    m = served_or_503(state)
    size = m.image_size
    return {
        "name": m.name, "version": m.version, "alias": m.alias, "classes": m.classes,
        "architecture": m.metadata.get("architecture"),
        "input": {"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, size, size, 3]},
        "output": {"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, len(m.classes)]},
        "image_size": size, "preprocessing": m.metadata.get("preprocessing", {}),
        "provider": m.providers[0], "providers": m.providers, "onnx_sha256": m.sha256,
        "onnx_origin": m.onnx_origin, "parity_max_abs_diff": m.parity_max_abs_diff,
        "loaded_at": m.loaded_at.isoformat(), "run_id": m.run_id,
        "max_batch_size": state.settings.max_batch_size,
        "max_queue_delay_ms": state.settings.max_queue_delay_ms,
    }
