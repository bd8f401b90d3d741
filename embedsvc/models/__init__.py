"""Model specs, their registry, and loading open_clip models without touching the network."""

from embedsvc.models.device import resolve_device, resolve_precision
from embedsvc.models.loader import LoadedModel, load_model
from embedsvc.models.registry import (MODEL_REGISTRY, ModelOptions, ModelSpec, get_model_spec, register_model,
                                     register_models_file, resolve_model_spec, spec_from_options)
from embedsvc.models.bundled import TINY_SCENES, register_bundled

register_bundled()

__all__ = [
    "MODEL_REGISTRY",
    "TINY_SCENES",
    "LoadedModel",
    "ModelOptions",
    "ModelSpec",
    "get_model_spec",
    "load_model",
    "register_model",
    "register_models_file",
    "resolve_device",
    "resolve_model_spec",
    "resolve_precision",
    "spec_from_options",
]
