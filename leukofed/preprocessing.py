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


# Bytes a pixel of each mode takes in Pillow's own raster (every 2- and 3-band mode is
# stored in 4 bytes); a mode not listed is refused before decoding, since its cost is unknown.
RASTER_BYTES: dict[str, int] = {
    "1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4,
    "LA": 4, "La": 4, "PA": 4, "RGB": 4, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4,
    "YCbCr": 4, "LAB": 4, "HSV": 4,
}
HIGH_BIT_DEPTH = ("I;16", "I;16B", "I;16L", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# High-bit-depth images are scaled to 8 bits a strip of rows at a time: the temporaries
# are a few MB whatever the image's size (they were float64 copies of the whole image).
STRIP_PIXELS = 1 << 18
STRIP_BYTES_PER_PIXEL = 24  # the strip's copy, its wide-integer or float32 working arrays


def _is_oriented(img: Image.Image) -> bool:
    """Whether exif_transpose will transpose (into a second raster, briefly), from the
    header only. A PNG's eXIf chunk may follow the image data, where only a full decode
    finds it (Pillow's PNG getexif decodes): without an early one, count the copy."""
    if img.format == "PNG" and "exif" not in img.info:
        return True
    try:
        return img.getexif().get(0x0112, 1) in range(2, 9)
    except Exception:
        return True  # unreadable EXIF: count the copy anyway


def decode_bytes(img: Image.Image) -> int:
    """Peak memory that decoding an opened (not yet loaded) image takes, from its header:
    the mode's real raster, the codec's whole-strip buffer (TIFF), the transposed copy when
    it carries an orientation, each conversion's temporaries and the RGB result. Raises
    UnsupportedImage for a mode whose cost is unknown."""
    if img.mode not in RASTER_BYTES:
        raise UnsupportedImage(f"image mode {img.mode} is not supported")
    raster = RASTER_BYTES[img.mode]
    width, height = img.size
    pixels = width * height
    loading = raster * (2 if img.format == "TIFF" else 1)  # libtiff reads a whole strip
    transposing = 2 * raster if _is_oriented(img) else raster
    if img.mode == "RGB":
        converting = raster
    elif img.mode in HIGH_BIT_DEPTH:
        converting = raster + 1 + 1 + 4  # source, 8-bit array, L image, RGB result
    elif img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        converting = raster + 4 + 4 + 4  # source, RGBA, white background, composite/RGB
    else:
        converting = raster + 4  # source and RGB result
    strips = min(pixels, STRIP_PIXELS) * STRIP_BYTES_PER_PIXEL if img.mode in HIGH_BIT_DEPTH else 0
    # + 1 a pixel: the codecs' own buffers (zlib, libjpeg rows, libtiff) and allocator slack
    return pixels * (max(loading, transposing, converting) + 1) + strips


def _strips(height: int, width: int) -> list[tuple[int, int]]:
    rows = max(1, STRIP_PIXELS // max(width, 1))
    return [(top, min(top + rows, height)) for top in range(0, height, rows)]


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """I;16, I and F to 8-bit L without a full-size wide copy: integers are scaled by their
    maximum (values up to 255 kept as they are), floats stretched from their minimum to
    their maximum; NaN becomes 0, infinities the ends. One strip of rows at a time."""
    width, height = img.size
    out = np.empty((height, width), dtype=np.uint8)
    strips = _strips(height, width)

    def strip(top: int, bottom: int) -> np.ndarray:
        return np.asarray(img.crop((0, top, width, bottom)))

    if img.mode == "F":
        lo, hi = np.inf, -np.inf
        for top, bottom in strips:
            part = strip(top, bottom)
            finite = part[np.isfinite(part)]
            if finite.size:
                lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
        if lo > hi:
            lo = hi = 0.0
        scale = 255.0 / ((hi - lo) or 1.0)
        for top, bottom in strips:
            part = strip(top, bottom).astype(np.float32)
            part = np.nan_to_num((part - np.float32(lo)) * np.float32(scale), nan=0.0)
            out[top:bottom] = part.clip(0, 255).astype(np.uint8)
    else:
        hi = max([int(strip(top, bottom).max()) for top, bottom in strips] + [255])
        for top, bottom in strips:
            part = strip(top, bottom).astype(np.int64).clip(0, None)
            out[top:bottom] = (part * 255 // hi).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in HIGH_BIT_DEPTH:
        return _high_bit_depth_to_l(img).convert("RGB")
    if img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        composite = Image.alpha_composite(
            Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        del rgba
        return composite.convert("RGB")
    return img.convert("RGB")


ACCEPTED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int | None = None) -> Image.Image:
    """Decode bytes to an RGB Pillow image, or raise ImageDecodeError with a reason.
    ``max_bytes``: refuse (ImageTooLarge) an image whose decoding would take more memory
    than this (decode_bytes, from the header, before anything is decoded)."""
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
    needed = decode_bytes(img)
    if max_bytes is not None and needed > max_bytes:
        raise ImageTooLarge(f"image too large: a {width}x{height} {img.mode} image takes "
                            f"{needed:,} bytes to decode > {max_bytes:,}")
    try:
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # a copy only when it transposes
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
