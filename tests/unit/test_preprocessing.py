"""The one preprocessing: every mode to RGB, EXIF orientation, clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from leukofed.preprocessing import ImageDecodeError, decode_image, load_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode,fmt", [
    ("RGB", "JPEG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG"),
    ("CMYK", "JPEG"), ("I;16", "TIFF"), ("RGB", "BMP"), ("RGB", "TIFF"),
])
def test_any_mode_becomes_rgb_at_model_size(mode: str, fmt: str) -> None:
    img = Image.new(mode, (40, 30))
    arr = load_image(_encode(img, fmt), 16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8


def test_transparent_pixels_become_white() -> None:
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(_encode(img, "PNG"), 4).min() == 255


def test_16_bit_scaled_to_8_bit() -> None:
    arr16 = np.full((4, 4), 65535, dtype=np.uint16)
    img = Image.frombytes("I;16", (4, 4), arr16.astype("<u2").tobytes())
    assert load_image(_encode(img, "TIFF"), 4).max() == 255


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(_encode(img, "JPEG", exif=exif))
    assert decoded.size == (20, 40)


@pytest.mark.parametrize("data,needle", [
    (b"", "empty"),
    (b"plain text, not an image", "not a recognised image"),
])
def test_bad_bytes_raise_clear_errors(data: bytes, needle: str) -> None:
    with pytest.raises(ImageDecodeError, match=needle):
        decode_image(data)


def test_truncated_and_oversized_images() -> None:
    png = _encode(Image.new("RGB", (64, 64), (10, 20, 30)), "JPEG")
    with pytest.raises(ImageDecodeError):
        decode_image(png[: len(png) // 3])
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(_encode(Image.new("L", (300, 300)), "PNG"), max_pixels=10_000)


def test_formats_beyond_the_accepted_ones_are_refused() -> None:
    """GIF, WebP or any other Pillow decoder is not opened: only JPEG, PNG, BMP and TIFF."""
    for fmt in ("GIF", "WEBP", "PPM"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 100, 50)).save(buf, format=fmt)
        with pytest.raises(ImageDecodeError, match="JPEG, PNG, BMP or TIFF"):
            decode_image(buf.getvalue())
