"""The micro-batcher: batches form under concurrency, never split, follow swaps."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from services.inference.batcher import MicroBatcher, NotReadyError, ShapeError


class FakeModel:
    def __init__(self, version: str, image_size: int = 4, delay: float = 0.01) -> None:
        self.version = version
        self.image_size = image_size
        self.delay = delay
        self.batches: list[int] = []
        self.lock = threading.Lock()

    def predict(self, images: np.ndarray) -> np.ndarray:
        time.sleep(self.delay)  # so requests pile up while a batch runs
        with self.lock:
            self.batches.append(len(images))
        # Row i answers with the image's first pixel value: lets tests check the order.
        return np.repeat(images[:, 0, 0, :1].astype(np.float32), 4, axis=1)


def images(n: int, value: int, size: int = 4) -> np.ndarray:
    return np.full((n, size, size, 3), value, np.uint8)


async def _run_clients(batcher: MicroBatcher, count: int, per_request: int = 1) -> list:
    batcher.start()
    try:
        return await asyncio.gather(*(batcher.submit(images(per_request, i))
                                      for i in range(count)))
    finally:
        await batcher.stop()


def test_concurrent_requests_share_batches_and_get_their_own_rows() -> None:
    model = FakeModel("1")
    batcher = MicroBatcher(lambda: model, max_batch_size=8, max_queue_delay_ms=5)
    results = asyncio.run(_run_clients(batcher, 32))
    for i, (probs, used) in enumerate(results):
        assert probs.shape == (1, 4) and probs[0, 0] == i and used is model
    assert sum(model.batches) == 32
    assert max(model.batches) == 8 and len(model.batches) <= 8


def test_max_batch_size_one_turns_batching_off() -> None:
    model = FakeModel("1", delay=0)
    batcher = MicroBatcher(lambda: model, max_batch_size=1, max_queue_delay_ms=0)
    asyncio.run(_run_clients(batcher, 10))
    assert model.batches == [1] * 10


def test_a_request_larger_than_the_space_left_is_not_split() -> None:
    model = FakeModel("1")
    batcher = MicroBatcher(lambda: model, max_batch_size=4, max_queue_delay_ms=20)
    results = asyncio.run(_run_clients(batcher, 5, per_request=3))
    assert all(p.shape == (3, 4) for p, _ in results)
    assert model.batches == [3] * 5


def test_a_swap_between_batches_is_picked_up_and_never_splits_a_batch() -> None:
    old, new = FakeModel("1"), FakeModel("2")
    current = {"model": old}

    async def scenario() -> list:
        batcher = MicroBatcher(lambda: current["model"], 4, 1)
        batcher.start()
        first = await asyncio.gather(*(batcher.submit(images(1, i)) for i in range(8)))
        current["model"] = new
        second = await asyncio.gather(*(batcher.submit(images(1, i)) for i in range(8)))
        await batcher.stop()
        return first + second

    results = asyncio.run(scenario())
    assert [used.version for _, used in results] == ["1"] * 8 + ["2"] * 8


def test_not_ready_and_shape_errors_reach_the_caller() -> None:
    async def scenario() -> None:
        empty = MicroBatcher(lambda: None, 4, 1)
        with pytest.raises(NotReadyError):
            await empty.submit(images(1, 0))
        model = FakeModel("1", image_size=8)
        batcher = MicroBatcher(lambda: model, 4, 1)
        batcher.start()
        with pytest.raises(ShapeError, match="does not match"):
            await batcher.submit(images(1, 0, size=4))
        # With the decoded sources the batch re-sizes instead of failing.
        from PIL import Image

        src = [Image.new("RGB", (10, 10), (7, 7, 7))]
        probs, _ = await batcher.submit(images(1, 7, size=4), sources=src)
        assert probs[0, 0] == 7
        await batcher.stop()

    asyncio.run(scenario())
