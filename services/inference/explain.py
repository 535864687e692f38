"""Heat maps by occlusion sensitivity, run on the same onnxruntime session that predicts.

Why occlusion and not Grad-CAM: it needs nothing but the served ONNX model, so the map
explains exactly the model that answered (Grad-CAM needs the Keras model, TensorFlow in
the serving process, ~0.5 GB more memory and seconds of import, and a chosen conv layer
per architecture). The price is compute: 1 + 7x7 forward passes, 1-10 times one Keras
forward + backward pass (the floor under Grad-CAM), measured per model in
docs/benchmarks-inference.md: ~25 ms for the default 64 px CNN, acceptable for a
person waiting on the page; explanations run outside the batcher and do not slow
/v1/predict's batches.

Method: a grey square of a quarter of the image side slides in steps of an eighth; the
drop of the predicted class's probability when a region is hidden is that region's
importance. Overlapping windows are averaged per pixel, so the map is smooth.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import numpy as np
from PIL import Image

GRID = 8  # stride = size / GRID, window = 2 * stride: (GRID - 1)^2 occluded copies
FILL = 128.0  # mid grey: hides content without adding an edge the model keys on


def occlusion_batch(image: np.ndarray, grid: int = GRID) -> tuple[np.ndarray, list[tuple]]:
    """The image followed by its occluded copies, and each copy's (y0, y1, x0, x1) window."""
    size = image.shape[0]
    stride = max(size // grid, 1)
    window = 2 * stride
    boxes = [(y, y + window, x, x + window)
             for y in range(0, size - window + 1, stride)
             for x in range(0, size - window + 1, stride)]
    batch = np.repeat(image[None].astype(np.float32), len(boxes) + 1, axis=0)
    for i, (y0, y1, x0, x1) in enumerate(boxes, start=1):
        batch[i, y0:y1, x0:x1] = FILL
    return batch, boxes


def occlusion_map(image: np.ndarray, predict: Callable[[np.ndarray], np.ndarray],
                  grid: int = GRID, chunk: int = 8) -> tuple[np.ndarray, np.ndarray, int]:
    """(heat in [0, 1] of shape (size, size), probabilities of the image, explained class).

    The 50 images run in chunks of ``chunk`` (the service passes its max batch size): on
    a small CPU onnxruntime's images/s drops beyond batch 4-8 for MobileNetV2."""
    batch, boxes = occlusion_batch(image, grid)
    probs = np.concatenate([predict(batch[i:i + chunk]) for i in range(0, len(batch), chunk)])
    target = int(np.argmax(probs[0]))
    drops = probs[0, target] - probs[1:, target]
    size = image.shape[0]
    total = np.zeros((size, size), np.float64)
    count = np.zeros((size, size), np.float64)
    for drop, (y0, y1, x0, x1) in zip(drops, boxes):
        total[y0:y1, x0:x1] += drop
        count[y0:y1, x0:x1] += 1
    heat = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    heat = np.clip(heat, 0, None)  # regions whose hiding raises the score explain nothing
    peak = heat.max()
    return (heat / peak if peak > 0 else heat), probs[0], target


def _colormap(heat: np.ndarray) -> np.ndarray:
    """Heat in [0, 1] to RGBA: transparent blue-ish when cold, opaque red when hot."""
    r = np.clip(1.5 * heat, 0, 1)
    g = np.clip(1.5 - np.abs(3 * heat - 1.8), 0, 1) * 0.9
    b = np.clip(1 - 2 * heat, 0, 1) * 0.6
    a = np.clip(heat * 0.85, 0, 0.85)
    return (np.stack([r, g, b, a], axis=-1) * 255).astype(np.uint8)


def heatmap_png(heat: np.ndarray, out_size: int = 256) -> bytes:
    """A translucent RGBA PNG, to be laid over the image (stretched to a square)."""
    img = Image.fromarray(_colormap(heat), mode="RGBA")
    img = img.resize((out_size, out_size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def png_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
