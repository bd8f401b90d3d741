"""Model specs, their registry, and loading open_clip models without touching the network.

The registry imports no torch (the CLI and the server's start-up checks use it before any model loads);
the device and loader names are resolved on first use (PEP 562)."""

import importlib

from embedsvc.models.bundled import DEFAULT_MODEL, TINY_SCENES, TINY_SCENES_2, register_bundled
from embedsvc.models.registry import (
    MODEL_REGISTRY,
    ModelOptions,
    ModelSpec,
    get_model_spec,
    register_model,
    register_models_file,
    resolve_model_spec,
    spec_from_options,
)

register_bundled()

_LAZY = {
    "resolve_device": "device",
    "resolve_precision": "device",
    "LoadedModel": "loader",
    "load_model": "loader",
    "weights_sha256": "loader",
    "input_size": "loader",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"embedsvc.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL",
    "MODEL_REGISTRY",
    "TINY_SCENES",
    "TINY_SCENES_2",
    "LoadedModel",
    "ModelOptions",
    "ModelSpec",
    "get_model_spec",
    "input_size",
    "load_model",
    "register_model",
    "register_models_file",
    "resolve_device",
    "resolve_model_spec",
    "resolve_precision",
    "spec_from_options",
    "weights_sha256",
]
