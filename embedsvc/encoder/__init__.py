"""Turns images and texts into token features in CLIP's joint embedding space."""

from embedsvc.encoder.embedder import Embedded, embed
from embedsvc.encoder.encoder import ClipEncoder
from embedsvc.encoder.images import DEFAULT_MAX_PIXELS, decode_image

__all__ = ["ClipEncoder", "DEFAULT_MAX_PIXELS", "Embedded", "decode_image", "embed"]
