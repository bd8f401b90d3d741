"""Image decoding: formats, limits, orientation, transparency; every failure a typed, actionable error."""

from __future__ import annotations

import io

import pytest
from conftest import png_bytes
from PIL import Image

from embedsvc.encoder import decode_image
from embedsvc.errors import ImageDecodeError, ImageTooLarge


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "HEIF", "AVIF"])
def test_supported_formats_decode_to_rgb(fmt):
    image = decode_image(png_bytes(size=(30, 20), fmt=fmt))
    assert image.mode == "RGB" and image.size == (30, 20)


def test_zero_bytes():
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")


@pytest.mark.parametrize("data", [b"not an image at all", b"%PDF-1.4 fake", bytes(range(256)) * 4])
def test_garbage(data):
    with pytest.raises(ImageDecodeError, match="not a JPEG, PNG, WebP, GIF, HEIC/HEIF or AVIF file"):
        decode_image(data)


def test_truncated_png():
    data = png_bytes(size=(200, 200))
    with pytest.raises(ImageDecodeError, match=r"corrupt or truncated|could not decode"):
        decode_image(data[: len(data) // 2])


def test_format_outside_allow_list():
    with pytest.raises(ImageDecodeError):
        decode_image(png_bytes(fmt="BMP"))


def test_pixel_limit_checked_before_decoding():
    with pytest.raises(ImageTooLarge, match="over the limit of 1,000"):
        decode_image(png_bytes(size=(50, 50)), max_pixels=1000)


def test_decompression_bomb_refused_from_header():
    # A 1-bit 30000x30000 PNG: a few hundred KB on the wire, 900 megapixels decoded.
    buffer = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 1_000_000
    with pytest.raises(ImageTooLarge, match=r"900000000 pixels.*limit is 150,000,000"):
        decode_image(buffer.getvalue())


def test_exif_orientation_applied():
    image = Image.new("RGB", (60, 20), (10, 200, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue()).size == (20, 60)


def test_transparency_composited_on_white():
    decoded = decode_image(png_bytes(size=(10, 10), color=(0, 0, 0, 0), mode="RGBA"))
    assert decoded.getpixel((9, 9)) == (255, 255, 255)


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    r, g, b = decode_image(buffer.getvalue()).getpixel((8, 8))
    assert r > 200 and b < 50
