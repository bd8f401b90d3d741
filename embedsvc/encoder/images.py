"""Safe image decoding at the size the model needs: format allow-list, pixel limits from the header before
decoding, truncation check, EXIF orientation, RGB.

A 12-megapixel photo decoded whole costs ~160 ms and 36 MB for a model that looks at 224x224 pixels. Given the
model's input size (`short_side`), a JPEG decodes with DCT scaling (libjpeg's 1/2, 1/4 or 1/8: the smallest
scale whose shorter side is still at least `short_side`, ~7x faster), and any decoded image is then reduced
at once by a whole factor (a box filter) while its shorter side stays at least 4x `short_side`, so only a
near model-sized image is held; the model's own resize and crop do the rest. Its vectors stay within cosine
0.99 of a full decode's (tests/test_photos.py). Every path that embeds images decodes through `decode_image`
with the model's size, so the server, the index job, Ray, compare and train give the same vectors.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import pillow_heif
from PIL import ExifTags, Image, UnidentifiedImageError

from embedsvc.errors import ImageDecodeError, ImageTooLarge

# HEIC/HEIF through pillow-heif, which applies the container's rotation and mirroring itself (and resets the
# EXIF orientation to 1). Embedded thumbnails are never decoded in place of the image; one thread per decode:
# decode_workers (or the index job's readers) set the parallelism.
pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False, decode_threads=1)

# 50 megapixels decoded: a 48 MP HEIF (a phone's full-resolution mode) decodes whole; a JPEG of any size up to
# DEFAULT_MAX_HEADER_PIXELS decodes scaled down (a 48 MP JPEG at 1/8: 0.75 MP).
DEFAULT_MAX_PIXELS = 50_000_000
# What a file may declare in its header, decoded or not: a decompression-bomb guard (a JPEG's whole scan is
# read even when it decodes at 1/8). Pillow's own guard refuses more than 2 x Image.MAX_IMAGE_PIXELS (179 MP).
DEFAULT_MAX_HEADER_PIXELS = 150_000_000
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "HEIF", "AVIF")
FORMAT_NAMES = "JPEG, PNG, WebP, GIF, HEIC/HEIF or AVIF"
# A decoded image is reduced while its shorter side stays >= REDUCING_GAP x the model's. A whole-factor
# reduction rounds the size up (3000 / 16 = 187.5 -> 188), which shifts the model's crop by part of a pixel: at
# 2x the 72 px bundled model's vectors fell to cosine 0.987 of a full decode's, at 3.2x and more they stay >= 0.999.
REDUCING_GAP = 4
# Formats of the JPEG decoder, which scales in the DCT: MPO is a JPEG with more pictures after the first (phones
# write them for depth or HDR gain maps).
JPEG_FORMATS = ("JPEG", "MPO")

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    short_side: int = 0,
    max_header_pixels: int = DEFAULT_MAX_HEADER_PIXELS,
    for_model: bool = True,
    budget: Callable[[int], None] | None = None,
) -> Image.Image:
    """Decodes encoded image bytes into an upright RGB image, or raises a typed error.

    The sizes are checked from the header, before any pixel is decoded: what the file declares against
    `max_header_pixels`, what the decoder will produce (a JPEG's scaled size) against `max_pixels`; so a small
    file that expands to gigabytes is refused without allocating them. With `short_side` (the model's input
    size: its preprocessing resizes the shorter side to it) the image decodes at the size the model needs (see
    the module's doc), and the resized image must fit `max_pixels` too, which bounds extreme aspect ratios (a
    100000x1 strip would become 22,400,000x224); `for_model=False` skips that check (a thumbnail's size).
    Transparent pixels are composited on white. `budget`, when given, is called with what `decoded_pixels` would
    return, from the same opened header and before any other limit is checked (a request's pixel budget, checked
    without opening a lone image twice); it refuses by raising.
    """
    if not data:
        raise ImageDecodeError(f"image is empty (0 bytes): send the encoded file's bytes ({FORMAT_NAMES})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our header limits decide
            image = _open(data, max_pixels, short_side, max_header_pixels, for_model, budget)
            if getattr(image, "n_frames", 1) > 1 and image.format != "HEIF":
                image.seek(0)  # animated GIF/WebP/AVIF: the first frame (a HEIF opens at its primary image)
            image.load()
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            return _upright(fit_to_model(_to_rgb(image), short_side), orientation)
    except (ImageTooLarge, ImageDecodeError):  # ours, already worded
        raise
    except Image.DecompressionBombError as exc:
        # Pillow's own guard fires inside open() for sizes far over its default; same meaning as ours.
        raise ImageTooLarge(
            f"image is too large to decode safely ({exc}); the limit is {max_header_pixels:,} "
            f"pixels: downscale it before sending"
        ) from exc
    except UnidentifiedImageError as exc:
        if _is_heif_family(data):  # libavif refuses a cut AVIF at the header already
            raise ImageDecodeError(
                f"could not decode image ({len(data)} bytes): a HEIF/AVIF file that is corrupt or truncated ({exc})"
            ) from exc
        raise ImageDecodeError(
            f"could not decode image ({len(data)} bytes): not a {FORMAT_NAMES} file ({exc})"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, RuntimeError) as exc:  # truncated or corrupt data
        raise ImageDecodeError(f"could not decode image ({len(data)} bytes): corrupt or truncated ({exc})") from exc


def decoded_pixels(data: bytes, short_side: int = 0) -> int:
    """Width x height `decode_image` will decode (a JPEG's scaled size), from the header without decoding;
    0 when the header is unreadable or over a limit (decode says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = _open(data, 1 << 62, short_side, 1 << 62, False)
    except Exception:  # noqa: BLE001 - any unreadable header: decode_image reports it with its index
        return 0
    return image.size[0] * image.size[1]


def header_pixels(data: bytes) -> int:
    """Width x height the file declares, from the header without decoding; 0 when it is unreadable."""
    return decoded_pixels(data, 0)


# ISO-BMFF major brands of HEIF and AVIF still images and sequences.
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis")


def _is_heif_family(data: bytes) -> bool:
    return data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS


def _open(
    data: bytes,
    max_pixels: int,
    short_side: int,
    max_header_pixels: int,
    for_model: bool,
    budget: Callable[[int], None] | None = None,
) -> Image.Image:
    """The image opened from its header (no pixel decoded yet), its sizes checked, a JPEG set to decode at the
    smallest DCT scale whose shorter side is still >= short_side. Draft sizes are in the stored orientation:
    the (short_side, short_side) asked for is the same turned or not. `budget` gets the pixels it will decode
    (0 for a JPEG too short for its header, as `decoded_pixels` says) before the limits are checked."""
    image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    declared = width, height = image.size
    short_of_data = None
    if image.format in JPEG_FORMATS:
        try:
            _check_jpeg_has_data(image, len(data))
        except ImageDecodeError as exc:  # raised below, after the size limits, which come first
            short_of_data = exc
        else:
            if short_side:
                image.draft("RGB", (short_side, short_side))  # sets the scale: nothing is decoded yet
    if budget is not None:
        budget(0 if short_of_data else image.size[0] * image.size[1])
    if width * height > max_header_pixels:
        raise ImageTooLarge(
            f"image declares {width}x{height} = {width * height:,} pixels, over the limit of {max_header_pixels:,}; "
            f"downscale it before sending"
        )
    if for_model:
        check_resized_size(declared, short_side, max_pixels)
    if short_of_data:
        raise short_of_data
    width, height = image.size
    if width * height > max_pixels:
        scaled = f", decoded at {width}x{height}," if image.size != declared else ""
        raise ImageTooLarge(
            f"image is {declared[0]}x{declared[1]}{scaled} = {width * height:,} pixels decoded, over the limit of "
            f"{max_pixels:,}; downscale it before sending"
        )
    return image


def fit_to_model(image: Image.Image, short_side: int) -> Image.Image:
    """The image reduced by the largest whole factor that keeps its shorter side >= REDUCING_GAP x short_side
    (the model's input size; 0: unchanged): what decode_image holds of a large image."""
    factor = min(image.size) // (REDUCING_GAP * short_side) if short_side else 1
    return image.reduce(factor) if factor >= 2 else image


def _upright(image: Image.Image, orientation: int) -> Image.Image:
    """The image turned as its EXIF orientation says (read from the file before reducing), tag dropped so that
    nothing turns it twice."""
    method = _TRANSPOSE.get(orientation)
    if method is None:
        return image
    upright = image.transpose(method)
    for key in ("exif", "xmp", "XML:com.adobe.xmp"):
        upright.info.pop(key, None)
    return upright


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
            f"(an aspect ratio over {max_pixels / short_side**2:,.0f}:1); crop it before sending"
        )


def split_by_resized_size(
    images, short_side: int, max_pixels: int = DEFAULT_MAX_PIXELS
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
    blocks = sum(
        _ceil_div(_ceil_div(width * h, h_max), 8) * _ceil_div(_ceil_div(height * v, v_max), 8) for _, h, v, _ in layers
    )
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
