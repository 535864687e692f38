"""Dynamic micro-batching, as Triton does it: concurrent requests run as one batch.

A request (one or more images) waits in a queue. The worker takes the first waiting
request, then everything already queued, then keeps collecting until the batch holds
``max_batch_size`` images or ``max_queue_delay_ms`` has passed since the first one, and
runs the whole batch in one onnxruntime call on a worker thread. While a batch runs, the
next one fills up, so under load batches grow on their own and at concurrency 1 the only
added latency is the (small, configurable) queue delay. ``max_batch_size=1`` turns
batching off. Each batch reads the served model once, so a hot swap never splits a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


class NotReadyError(RuntimeError):
    """No model is loaded yet."""


@dataclass
class _Item:
    images: np.ndarray
    future: asyncio.Future
    sources: list[Any] | None  # decoded Pillow images, to re-size after a swap


class ShapeError(ValueError):
    """A tensor does not match the served model's input shape."""


class MicroBatcher:
    def __init__(self, get_model: Callable[[], Any], max_batch_size: int,
                 max_queue_delay_ms: float,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self.get_model = get_model
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_ms / 1000.0
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._held: _Item | None = None  # too big to join the last batch: opens the next

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, images: np.ndarray,
                     sources: list[Any] | None = None) -> tuple[np.ndarray, Any]:
        """Probabilities for ``images`` (N, S, S, 3) and the served model that made them.

        ``sources`` (the decoded images) let the batch re-size them when a swap brought a
        model with another input size; without them such a request fails with ShapeError.
        """
        if self.get_model() is None:
            raise NotReadyError("no model loaded")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(images, future, sources))
        return await future

    async def _collect(self) -> list[_Item]:
        if self._held is not None:
            batch, self._held = [self._held], None
        else:
            batch = [await self._queue.get()]
        count = len(batch[0].images)
        deadline = time.monotonic() + self.max_delay
        while count < self.max_batch_size:
            if self._queue.empty():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                item = self._queue.get_nowait()
            if count + len(item.images) > self.max_batch_size:
                self._held = item  # too big to join: it opens the next batch, never split
                break
            batch.append(item)
            count += len(item.images)
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            model = self.get_model()  # read once: a swap never splits a batch
            try:
                if model is None:
                    raise NotReadyError("no model loaded")
                batch = _resize_to_model(batch, model.image_size)
                if not batch:
                    continue
                images = np.concatenate([item.images for item in batch])
                started = time.perf_counter()
                probs = await asyncio.to_thread(model.predict, images)
                if self.on_batch:
                    self.on_batch(len(images), time.perf_counter() - started)
            except Exception as exc:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            start = 0
            for item in batch:
                n = len(item.images)
                if not item.future.done():  # the client may have gone away
                    item.future.set_result((probs[start:start + n], model))
                start += n


def _resize_to_model(batch: list[_Item], size: int) -> list[_Item]:
    """Items whose images match ``size``: re-sized from their sources, or failed."""
    from leukofed.preprocessing import to_model_input

    kept = []
    for item in batch:
        if item.images.shape[1:] != (size, size, 3):
            if item.sources is None:
                if not item.future.done():
                    item.future.set_exception(ShapeError(
                        f"input shape {list(item.images.shape)} does not match the model's "
                        f"[-1, {size}, {size}, 3]"))
                continue
            item.images = np.stack([to_model_input(img, size) for img in item.sources])
        kept.append(item)
    return kept
