"""POST /v1/predict and POST /v1/explain: images in, probabilities (and heat maps) out.

Every prediction also says whether the image resembles the model version's training
images (``ServedModel.judge`` on the exact uint8 input the model saw) and, when the
version carries a calibration, its calibrated probabilities and conformal prediction set
(``ServedModel.answers``). An image unlike the training images, or whose prediction set is
not a single class, is answered "refer to a hematologist" with the reasons.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import numpy as np
from fastapi import APIRouter, Depends, File, HTTPException, UploadFile
from starlette.concurrency import run_in_threadpool

from leukofed.preprocessing import to_model_input

from ..batcher import NotReadyError
from ..explain import GRID, heatmap_png, occlusion_map, png_base64
from ..imaging import DecodedImage, InputError, decode_all, model_batch, request_cost
from ..model_source import Referral, ServedModel
from ..schemas import ExplainResponse, PredictResponse
from ..security import require_api_key
from ..state import ServiceState, get_state

router = APIRouter(prefix="/v1", tags=["predict"], dependencies=[Depends(require_api_key)])


def served_or_503(state: ServiceState) -> ServedModel:
    model = state.source.current
    if model is None:
        raise HTTPException(503, f"not ready: {state.source.status}",
                            headers={"Retry-After": "5"})
    return model


@contextlib.asynccontextmanager
async def read_uploads(state: ServiceState, uploads: list[UploadFile], size: int | None = None
                       ) -> AsyncIterator[tuple[list[DecodedImage], np.ndarray | None]]:
    """Decode the uploads (and resize them to ``size``) inside the block, which holds their
    decode memory (``state.decode``) until it ends: the decoded images live that long.
    Bad input fails before anything else, so a client learns about a broken file even
    while no model is loaded."""
    s = state.settings
    if not uploads:
        raise InputError(422, "no image: send files in the multipart field 'files' "
                              "(or a single one in 'file')")
    if len(uploads) > s.max_files:
        raise InputError(413, f"{len(uploads)} files in one request; the limit is {s.max_files}")
    files = [(u.filename or f"file {i + 1}", await u.read()) for i, u in enumerate(uploads)]
    # Headers and decoding are CPU work: off the event loop so other requests keep flowing.
    cost = await run_in_threadpool(request_cost, files, s.max_upload_bytes, s.max_pixels,
                                   s.max_request_pixels)
    async with state.decode.reserve(cost):
        yield await run_in_threadpool(decode_all, files, s.max_upload_bytes, s.max_pixels,
                                      size)


def predictions(model: ServedModel, filenames: list[str], probs: np.ndarray,
                referrals: list[Referral]) -> list[dict]:
    """The v1 prediction objects from the model's RAW probabilities (N, C)."""
    return [{"filename": name, **answer.fields(model.classes)}
            for name, answer in zip(filenames, model.answers(probs, referrals))]


async def judged(model: ServedModel, images: np.ndarray) -> list[Referral]:
    """The out-of-distribution verdicts on the model inputs, off the event loop."""
    return await run_in_threadpool(model.judge, images)


@router.post("/predict", response_model=PredictResponse,
             summary="Classify one or more images (multipart field 'files' or 'file')")
async def predict(files: list[UploadFile] | None = File(None),
                  file: UploadFile | None = File(None),
                  state: ServiceState = Depends(get_state)) -> dict:
    current = state.source.current
    uploads = [*(files or []), *([file] if file else [])]
    # The full-size images stay (the batch re-sizes them after a swap), and so does their
    # decode memory reservation, until the answer.
    async with read_uploads(state, uploads, current.image_size if current else None
                            ) as (decoded, batch):
        model = served_or_503(state)
        if batch is None or batch.shape[1] != model.image_size:  # a model arrived meanwhile
            batch = await run_in_threadpool(model_batch, decoded, model.image_size)
        # The check runs beside the model (it needs only the inputs), not after it.
        check = asyncio.ensure_future(judged(model, batch))
        try:
            probs, used = await state.batcher.submit(batch, sources=[d.image for d in decoded])
        except NotReadyError as exc:
            raise HTTPException(503, f"not ready: {state.source.status}") from exc
        finally:
            referrals = await check
        if used is not model:  # a swap in between: judge against the version that answered
            if batch.shape[1] != used.image_size:
                batch = await run_in_threadpool(model_batch, decoded, used.image_size)
            referrals = await judged(used, batch)
        return {"model": state.model_ref(used),
                "predictions": predictions(used, [d.filename for d in decoded], probs,
                                           referrals)}


@router.post("/explain", response_model=ExplainResponse,
             summary="Classify one image and return an occlusion heat map (PNG)")
async def explain(file: UploadFile | None = File(None),
                  files: list[UploadFile] | None = File(None),
                  state: ServiceState = Depends(get_state)) -> dict:
    uploads = [*([file] if file else []), *(files or [])]
    if len(uploads) > 1:
        raise InputError(422, f"/v1/explain takes one image, got {len(uploads)}")
    async with read_uploads(state, uploads) as ((decoded,), _):
        model = served_or_503(state)
        image = await run_in_threadpool(to_model_input, decoded.image, model.image_size)
        filename = decoded.filename
        del decoded  # the full-size image and its decode memory go before the heat map
    check = asyncio.ensure_future(judged(model, image[None]))
    started = time.perf_counter()
    try:
        heat, probs, target = await asyncio.to_thread(
            occlusion_map, image, model.predict, GRID, state.settings.max_batch_size)
        png = await run_in_threadpool(heatmap_png, heat)
    finally:
        (referral,) = await check
    elapsed = (time.perf_counter() - started) * 1000
    return {"model": state.model_ref(model),
            "prediction": predictions(model, [filename], probs[None],
                                      [referral])[0],
            "heatmap": {"method": "occlusion", "explained_class": model.classes[target],
                        "media_type": "image/png", "png_base64": png_base64(png),
                        "grid": GRID, "elapsed_ms": round(elapsed, 2)}}
