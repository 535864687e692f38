"""/v1/hospitals: which hospitals have a live worker (it answers a ping or its heartbeat is
fresh, leukofed.liveness), when each was last seen, its data."""

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
    known = sorted(set(dispatcher.last_seen) | live)
    beats: dict[str, float | None] = {}
    if known and hasattr(dispatcher, "heartbeats"):  # a busy worker beats, it does not ping
        try:
            beats = await run_in_threadpool(dispatcher.heartbeats, known)
        except Exception:  # the broker is down: live and last_seen still say what they know
            beats = {}
    now = time.time()
    out = []
    for h in known:
        d = dispatcher.describes.get(h, {})
        seen = dispatcher.last_seen.get(h)
        out.append({"hospital": h, "live": h in live or beats.get(h) is not None,
                    "heartbeat": beats.get(h) is not None, "last_seen": seen,
                    "seconds_since_seen": None if seen is None else round(now - seen, 1),
                    "num_images": d.get("num_images"), "class_counts": d.get("class_counts"),
                    "splits": d.get("splits"), "dataset_fingerprint": d.get(
                        "dataset_fingerprint")})
    return out
