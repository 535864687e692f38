"""The cap on decoding memory: all requests in flight together, in real bytes.

Every request reserves what its images take to decode (``leukofed.preprocessing.decode_bytes``
from each header: the mode's real raster, conversion temporaries, the RGB result) before
anything is decoded, and holds it until it no longer holds the decoded images (a
prediction keeps them until its batch has run, to re-size them after a model swap). A
request that needs more than the whole budget is refused (413); one that finds the budget
taken waits up to ``decode_wait_s`` and is then answered 429 with ``Retry-After`` (a client
error, like the rate limit's: the client may retry; never a 500). So a
burst of worst-case uploads (a 70 KB 16-bit TIFF that claims 24 megapixels) is decoded a
few at a time, whatever uvicorn accepts, and ordinary small images pass side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import HTTPException

from .imaging import InputError, human_bytes

RETRY_AFTER_S = 2


class DecodeBudget:
    """A weighted semaphore on the event loop (acquired and released there only)."""

    def __init__(self, total_bytes: int, wait_s: float) -> None:
        self.total = total_bytes
        self.wait_s = wait_s
        self.in_use = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[None]:
        """Hold ``nbytes`` of the budget for the block: 413 when it can never fit, 429
        when it does not fit within ``wait_s``."""
        if nbytes > self.total:
            raise InputError(413, f"the images of this request take {human_bytes(nbytes)} "
                                  f"to decode, over the service's decode memory of "
                                  f"{human_bytes(self.total)} "
                                  "(LEUKOFED_INFERENCE_DECODE_MEMORY_BYTES): send fewer, "
                                  "smaller or 8-bit images")
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.in_use + nbytes <= self.total),
                    self.wait_s)
            except TimeoutError:
                raise HTTPException(
                    429, f"busy: other requests' images hold the decode memory "
                         f"({human_bytes(self.in_use)} of {human_bytes(self.total)}); "
                         f"retry after {RETRY_AFTER_S} s (LEUKOFED_INFERENCE_DECODE_MEMORY_BYTES)",
                    headers={"Retry-After": str(RETRY_AFTER_S)}) from None
            self.in_use += nbytes
        try:
            yield
        finally:
            async with self._changed:
                self.in_use -= nbytes
                self._changed.notify_all()
