"""Safe image decoding: format allow-list, pixel limits before decoding, truncation check, EXIF orientation, RGB."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from embedsvc.errors import ImageDecodeError, ImageTooLarge

# 40 megapixels: above any camera photo worth embedding at 224 px, far below a decompression bomb.
DEFAULT_MAX_PIXELS = 40_000_000
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, short_side: int = 0) -> Image.Image:
    """Decodes encoded image bytes into an upright RGB image, or raises a typed error.

    The size is checked from the header, before any pixel is decoded, so a small file that expands
    to gigabytes is refused without allocating them. With `short_side` (the model's input size: its
    preprocessing resizes the shorter side to it) the resized image must fit `max_pixels` too, which
    bounds extreme aspect ratios (a 100000x1 strip would become 22,400,000x224). Transparent pixels are
    composited on white.
    """
    if not data:
        raise ImageDecodeError("image is empty (0 bytes): send the encoded file's bytes (JPEG, PNG, WebP or GIF)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}; "
                    f"downscale it before sending"
                )
            check_resized_size(image.size, short_side, max_pixels)
            if image.format == "JPEG":
                _check_jpeg_has_data(image, len(data))
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animated GIF/WebP: the first frame
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # no copy of an upright image (most are)
            return _to_rgb(image)
    except (ImageTooLarge, ImageDecodeError):  # ours, already worded
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fires inside open() for sizes far over its default; same meaning as ours.
        raise ImageTooLarge(f"image is too large to decode safely ({exc}); the limit is {max_pixels:,} pixels: "
                            f"downscale it before sending") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"could not decode image ({len(data)} bytes): not a JPEG, PNG, WebP or GIF file ({exc})"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise ImageDecodeError(f"could not decode image ({len(data)} bytes): corrupt or truncated ({exc})") from exc


def header_pixels(data: bytes) -> int:
    """Width x height from the header without decoding; 0 when the header is unreadable (decode says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            width, height = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS).size
    except Exception:  # noqa: BLE001 - any unreadable header: decode_image reports it with its index
        return 0
    return width * height


def check_resized_size(size: tuple[int, int], short_side: int, max_pixels: int) -> None:
    """Refuses an image whose shorter side scaled to `short_side` would exceed `max_pixels` (0: no check)."""
    width, height = size
    if not short_side or not width or not height:
        return
    long_side = _ceil_div(max(width, height) * short_side, min(width, height))
    if long_side * short_side > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height}: resized to the model's {short_side}-pixel input it would be "
            f"{long_side:,}x{short_side} = {long_side * short_side:,} pixels, over the limit of {max_pixels:,} "
            f"(an aspect ratio over {max_pixels / short_side ** 2:,.0f}:1); crop it before sending"
        )


def split_by_resized_size(images, short_side: int, max_pixels: int = DEFAULT_MAX_PIXELS
                          ) -> tuple[list[int], dict[int, str]]:
    """(indexes of the decoded images that `check_resized_size` accepts, {index: reason} for the others):
    offline jobs skip what the server would refuse."""
    keep, refused = [], {}
    for i, image in enumerate(images):
        try:
            check_resized_size(image.size, short_side, max_pixels)
            keep.append(i)
        except ImageTooLarge as exc:
            refused[i] = str(exc)
    return keep, refused


def _check_jpeg_has_data(image: Image.Image, file_bytes: int) -> None:
    """Refuses a JPEG too small to hold the blocks its header declares.

    libjpeg fills missing data with grey and only warns, so a header declaring 6000x6000 over 16x16 of
    data decodes "fine". Every 8x8 block of each component costs at least one bit of Huffman-coded data
    (its DC code), so a file with fewer bits than blocks is truncated or inconsistent. (Arithmetic-coded
    JPEGs, which could be smaller, are exotic; they are refused as well when they fall under the bound.)
    """
    width, height = image.size
    layers = getattr(image, "layer", None) or [("", 1, 1, 0)]  # (component id, h sampling, v sampling, table)
    h_max = max(layer[1] for layer in layers)
    v_max = max(layer[2] for layer in layers)
    blocks = sum(_ceil_div(_ceil_div(width * h, h_max), 8) * _ceil_div(_ceil_div(height * v, v_max), 8)
                 for _, h, v, _ in layers)
    if file_bytes * 8 < blocks:
        raise ImageDecodeError(
            f"could not decode image ({file_bytes:,} bytes): the JPEG header declares {width}x{height} pixels "
            f"({blocks:,} blocks), more than {file_bytes:,} bytes can hold: truncated or inconsistent"
        )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


THUMBNAIL_SIDE = 256


def thumbnail_jpeg(image: Image.Image, side: int = THUMBNAIL_SIDE, quality: int = 80) -> bytes:
    """A small JPEG of a decoded image (longest side `side` px, never upscaled), for showing search hits."""
    small = _to_rgb(image).copy()
    small.thumbnail((side, side))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
