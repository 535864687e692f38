"""Uploaded files to model input, with the HTTP status each kind of bad input deserves.

Decoding is the shared ``leukofed.preprocessing`` (one definition for training, export
and serving); this module only adds the size limits and the mapping of its errors to
statuses: too large -> 413, not an image -> 415, empty or broken -> 422. Every message
names the file, so a user with twenty uploads knows which one to fix.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from leukofed.preprocessing import (
    ACCEPTED_FORMATS,
    ImageDecodeError,
    ImageTooLarge,
    UnsupportedImage,
    decode_bytes,
    decode_image,
    to_model_input,
)


class InputError(Exception):
    """A client error with its HTTP status; the service keeps serving."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def human_bytes(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MB" if n >= 1024 * 1024 else f"{n} bytes"


def status_for(error: ImageDecodeError) -> int:
    """The HTTP status for a decode error, by its type."""
    if isinstance(error, ImageTooLarge):
        return 413
    if isinstance(error, UnsupportedImage):
        return 415
    return 422  # empty, truncated, corrupt


@dataclass
class DecodedImage:
    filename: str
    image: Image.Image  # RGB, EXIF orientation applied, original size


def decode_upload(filename: str, data: bytes, max_bytes: int, max_pixels: int) -> DecodedImage:
    """Decode one uploaded file or raise InputError naming it."""
    if len(data) > max_bytes:
        raise InputError(413, f"{filename}: file is {human_bytes(len(data))}, over the "
                              f"{human_bytes(max_bytes)} upload limit")
    try:
        image = decode_image(data, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        raise InputError(status_for(exc), f"{filename}: {exc}") from exc
    return DecodedImage(filename, image)


def header_cost(data: bytes) -> tuple[int, int] | None:
    """(pixels, bytes its decoding takes) from the image header alone (nothing decoded);
    None if unreadable or of a mode that is refused (decode_upload words the error)."""
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:
            width, height = img.size
            return width * height, decode_bytes(img)
    except Exception:
        return None


def request_cost(files: list[tuple[str, bytes]], max_bytes: int, max_pixels: int,
                 max_request_pixels: int | None = None) -> int:
    """The bytes decoding the request's files takes (those within the per-file limits;
    the others are refused without decoding). 413 before anything is decoded when they add
    up to more pixels than one request may make the service hold."""
    costs = [header_cost(data) for _, data in files if len(data) <= max_bytes]
    counted = [c for c in costs if c is not None and c[0] <= max_pixels]
    total = sum(pixels for pixels, _ in counted)
    if max_request_pixels is not None and total > max_request_pixels:
        raise InputError(413, f"{len(files)} images of {total:,} pixels in all, over the "
                              f"budget of {max_request_pixels:,} pixels per request: send "
                              "fewer or smaller images per request")
    return sum(nbytes for _, nbytes in counted)


def decode_all(files: list[tuple[str, bytes]], max_bytes: int, max_pixels: int,
               size: int | None) -> tuple[list[DecodedImage], np.ndarray | None]:
    """Decode the files one at a time and, when the model's size is known, build its input
    batch: one worker-thread hop per request instead of one per step."""
    decoded = [decode_upload(name, data, max_bytes, max_pixels) for name, data in files]
    return decoded, (model_batch(decoded, size) if size else None)


def model_batch(images: list[DecodedImage], size: int) -> np.ndarray:
    """uint8 (N, size, size, 3): the model's input, resized exactly as in training."""
    return np.stack([to_model_input(d.image, size) for d in images])
