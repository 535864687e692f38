"""/v1/hospitals: which hospitals have a live worker, when each was last seen, its data."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

router = APIRouter(prefix="/v1/hospitals", tags=["hospitals"])


@router.get("", summary="Hospitals with a live worker, last seen, example counts")
async def list_hospitals(request: Request) -> list[dict[str, Any]]:
    dispatcher = request.app.state.dispatcher
    live = await run_in_threadpool(dispatcher.live_hospitals) or set()
    missing = [h for h in live if h not in dispatcher.describes]
    if missing:
        await run_in_threadpool(dispatcher.describe, missing)
    now = time.time()
    out = []
    for h in sorted(set(dispatcher.last_seen) | live):
        d = dispatcher.describes.get(h, {})
        seen = dispatcher.last_seen.get(h)
        out.append({"hospital": h, "live": h in live, "last_seen": seen,
                    "seconds_since_seen": None if seen is None else round(now - seen, 1),
                    "num_images": d.get("num_images"), "class_counts": d.get("class_counts"),
                    "splits": d.get("splits"), "dataset_fingerprint": d.get(
                        "dataset_fingerprint")})
    return out
