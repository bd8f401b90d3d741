"""Safe image decoding: format allow-list, pixel limit before decoding, EXIF orientation, RGB."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from embedsvc.errors import ImageDecodeError, ImageTooLarge

# 40 megapixels: above any camera photo worth embedding at 224 px, far below a decompression bomb.
DEFAULT_MAX_PIXELS = 40_000_000
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decodes encoded image bytes into an upright RGB image, or raises a typed error.

    The size is checked from the header, before any pixel is decoded, so a small file that expands
    to gigabytes is refused without allocating them. Transparent pixels are composited on white.
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
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animated GIF/WebP: the first frame
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except ImageTooLarge:
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
