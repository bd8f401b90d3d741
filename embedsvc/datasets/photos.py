"""Camera-sized test photos made from real photographs that ship on disk (no download).

scikit-image's `skimage.data` and scikit-learn's `load_sample_images` carry a handful of small real photos
(astronaut, coffee, rocket, a cat, a Chinese temple, a flower, ...). `photo(i)` crops one of them (a different
region per index, so photos differ), upscales the crop to a camera's size (12 MP by default) and encodes it as
a camera does (JPEG quality 90, 4:2:0): what `embedsvc index` meets in a folder of phone photos, made in
~0.2 s each. Needs scikit-image or scikit-learn (the dev extra); either alone is enough.
"""

from __future__ import annotations

import functools
import io
from typing import Any

import numpy as np
from PIL import Image

# skimage.data photos bundled in its wheel (others are downloaded on first use: not those).
SKIMAGE_PHOTOS = (
    "astronaut",
    "coffee",
    "rocket",
    "chelsea",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
)
CAMERA_12MP = (4000, 3000)
CAMERA_48MP = (8000, 6000)


@functools.lru_cache(maxsize=1)
def source_photos() -> tuple[Image.Image, ...]:
    """The real photos found on disk, RGB; raises when neither scikit-image nor scikit-learn is installed."""
    photos = []
    try:
        import skimage.data

        for name in SKIMAGE_PHOTOS:
            photos.append(Image.fromarray(getattr(skimage.data, name)()).convert("RGB"))
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        photos += [Image.fromarray(a).convert("RGB") for a in load_sample_images().images]
    except ImportError:
        pass
    if not photos:
        raise RuntimeError("photos need scikit-image or scikit-learn (pip install scikit-image scikit-learn)")
    return tuple(photos)


def photo_image(index: int, size: tuple[int, int] = CAMERA_12MP) -> Image.Image:
    """Photo `index`: a crop of a source photo (which one and where follow from the index), upscaled to `size`."""
    sources = source_photos()
    source = sources[index % len(sources)]
    rng = np.random.default_rng([index, 0x9407])
    width, height = source.size
    aspect = size[0] / size[1]
    crop_h = int(height * rng.uniform(0.6, 1.0))
    crop_w = min(width, int(crop_h * aspect))
    crop_h = int(crop_w / aspect)
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    image = source.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image.resize(size, Image.Resampling.BICUBIC)


def photo(
    index: int, size: tuple[int, int] = CAMERA_12MP, quality: int = 90, fmt: str = "JPEG", orientation: int = 1
) -> bytes:
    """Photo `index` encoded as `fmt` (see `encode`)."""
    return encode(photo_image(index, size), fmt, quality, orientation)


def encode(image: Image.Image, fmt: str = "JPEG", quality: int = 90, orientation: int = 1) -> bytes:
    """`image` encoded as `fmt` (JPEG as cameras write it; PNG, WEBP, HEIF through pillow-heif, AVIF), with an
    EXIF orientation tag when `orientation` is not 1 (telling viewers to turn the stored pixels; pillow-heif
    stores it as the container's rotation and mirroring, as phones do). HEIF and AVIF are encoded at their
    encoders' fastest settings (x265's ultrafast preset: 0.4 s for 2 MP instead of 2.7 s; AVIF speed 10): what a
    decoder reads is the same format either way."""
    kwargs: dict[str, Any] = {"quality": quality} if fmt != "PNG" else {}
    if fmt == "AVIF":
        kwargs["speed"] = 10
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.from_pillow(image).save(buffer, enc_params={"preset": "ultrafast"}, **kwargs)
    else:
        image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()
