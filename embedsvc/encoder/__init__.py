"""Turns images and texts into token features in CLIP's joint embedding space.

Image decoding needs no torch (a bulk job that sends images to a server decodes only); the model-side names
are resolved on first use (PEP 562)."""

import importlib

from embedsvc.encoder.images import DEFAULT_MAX_PIXELS, decode_image

_LAZY = {"Embedded": "embedder", "embed": "embedder", "ClipEncoder": "encoder"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"embedsvc.encoder.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_MAX_PIXELS", "ClipEncoder", "Embedded", "decode_image", "embed"]
