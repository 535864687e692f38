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


def _worst_case(mode: str, fmt: str, size: tuple[int, int], **save: object) -> bytes:
    """A blank image of ``mode`` (one bright pixel, so scaling has a maximum): tens of KB
    that claim ``size``; TIFFs in one strip, libtiff's largest read buffer."""
    img = Image.new(mode, size)
    img.putpixel((0, 0), {"I;16": 4000, "I": 70000, "F": 3.5}.get(mode, 200))
    if fmt == "TIFF":
        save = {"compression": "tiff_adobe_deflate", "strip_size": 1 << 30, **save}
    return _encode(img, fmt, **save)


_MEASURE = """
import sys
from leukofed.preprocessing import decode_image
data = open(sys.argv[1], "rb").read()
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
before = status("VmHWM:")
img = decode_image(data)
print(status("VmHWM:") - before)
"""


def _rotated_jpeg(size: tuple[int, int]) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.new("RGB", size, (200, 180, 190)), "JPEG", exif=exif)


@pytest.mark.parametrize(("mode", "fmt"), [
    ("I;16", "TIFF"), ("I", "TIFF"), ("F", "TIFF"), ("RGB", "TIFF"), ("CMYK", "TIFF"),
    ("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("L", "PNG"), ("1", "PNG"),
    ("RGB", "rotated JPEG")])
def test_attack_decoding_takes_no_more_than_its_counted_bytes(
        tmp_path, mode: str, fmt: str) -> None:
    """Each mode's worst case, decoded in a fresh process: its peak memory stays within
    decode_bytes, which the service reserves from the header before decoding. A 12 MP
    16-bit TIFF of 40 KB took 300 MB (float64 copies), now at most 8 bytes a pixel."""
    import subprocess
    import sys

    from leukofed.preprocessing import decode_bytes

    size = (4000, 3000)
    data = _rotated_jpeg(size) if fmt == "rotated JPEG" else _worst_case(
        mode, fmt, size, **({"transparency": 0} if mode == "P" else {}))
    path = tmp_path / "image"
    path.write_bytes(data)
    with Image.open(path) as img:
        counted = decode_bytes(img)
    peak = int(subprocess.run([sys.executable, "-c", _MEASURE, str(path)], check=True,
                              capture_output=True, text=True).stdout)
    assert peak <= counted, f"{mode} {fmt}: {peak:,} bytes > counted {counted:,}"
    if mode == "I;16":
        assert len(data) < 100_000 and peak < 8 * 12_000_000
