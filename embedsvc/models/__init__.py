"""Model specs, their registry, and loading open_clip models without touching the network."""

from embedsvc.models.device import resolve_device, resolve_precision
from embedsvc.models.loader import LoadedModel, load_model
from embedsvc.models.registry import MODEL_REGISTRY, ModelSpec, get_model_spec, register_model, resolve_model_spec
from embedsvc.models.bundled import TINY_SCENES, register_bundled

register_bundled()

__all__ = [
    "MODEL_REGISTRY",
    "TINY_SCENES",
    "LoadedModel",
    "ModelSpec",
    "get_model_spec",
    "load_model",
    "register_model",
    "resolve_device",
    "resolve_model_spec",
    "resolve_precision",
]
