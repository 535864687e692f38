"""The one image preprocessing definition: training, ONNX export and serving all call it.

An image becomes an RGB uint8 array of shape (size, size, 3), resized with Pillow's
bilinear filter. Scaling to the network's input range happens inside the model graph,
so the ONNX model takes float32 0-255 RGB NHWC exactly as described by PREPROCESSING.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Described in every saved model's metadata and in the ONNX metadata_props.
PREPROCESSING: dict[str, object] = {
    "decode": "Pillow, EXIF orientation applied, any mode converted to RGB",
    "resize": "Pillow bilinear to (size, size), aspect ratio not kept",
    "color": "RGB",
    "layout": "NHWC",
    "dtype": "float32",
    "range": [0, 255],
    "scaling": "inside the model graph",
}

# Pillow's own bomb guard raises at 2x this; we refuse anything above it ourselves.
DEFAULT_MAX_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (empty, truncated, corrupt)."""


class ImageTooLarge(ImageDecodeError):
    """More pixels than allowed (a decompression bomb, or over the service's budget)."""


class UnsupportedImage(ImageDecodeError):
    """Not one of the accepted formats (JPEG, PNG, BMP, TIFF)."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) or 1.0
        arr8 = (arr * (255.0 / max(hi, 255.0))).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = (arr - arr.min()) / ((arr.max() - arr.min()) or 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


ACCEPTED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode bytes to an RGB Pillow image, or raise ImageDecodeError with a reason."""
    if not data:
        raise ImageDecodeError("empty file")
    try:
        # Only the formats we promise: every other Pillow decoder (EPS, PSD, ICNS, ...) is
        # attack surface that a blood-smear upload never needs.
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large: {exc}") from exc
    except Exception as exc:  # Pillow raises several types for "not an image"
        raise UnsupportedImage("not a recognised image (JPEG, PNG, BMP or TIFF)") from exc
    width, height = img.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image too large: {width}x{height} = {width * height} pixels > {max_pixels}"
        )
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc


def to_model_input(img: Image.Image, size: int) -> np.ndarray:
    """Resize an RGB image to the model's square input; uint8 (size, size, 3)."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def load_image(source: bytes | str | Path, size: int) -> np.ndarray:
    """Bytes or a path to the model's uint8 input array: the single preprocessing path."""
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
    return to_model_input(decode_image(data), size)
