"""The one model option group every command that names a model shares: same flags, same meaning.

--model NAME          a registered model (bundled, or from the models file), or an open_clip architecture
                      together with a weight source
--pretrained TAG      open_clip pretrained tag (weights from the local caches only)
--checkpoint PATH     local open_clip state dict; --model defaults to its file stem and --model-config to
                      the NAME.json beside it (what `embedsvc train` writes)
--model-config JSON   open_clip model config of an architecture open_clip does not ship
--models-file JSON    model specs to register first (default: $EMBEDSVC_MODELS_FILE)

Importing this module costs nothing: the model registry (and torch) load only when a spec is resolved.
"""

from __future__ import annotations

import argparse
import os

MODELS_FILE_ENV = "EMBEDSVC_MODELS_FILE"


def add_model_arguments(
    parser: argparse.ArgumentParser,
    *,
    flag: str = "--model",
    random_init: bool = False,
    models_file: bool = True,
    what: str = "the model",
    default: str = "the bundled model",
) -> None:
    """Adds the group; `flag` renames --model (train: --init), `random_init` adds --random-init."""
    group = parser.add_argument_group("model", f"{what}: a registered name, or an architecture with a weight source")
    group.add_argument(
        flag,
        dest="model",
        default="",
        metavar="NAME",
        help="registered model name, or an open_clip architecture together with --pretrained or "
        f"--checkpoint (default: {default}; with --checkpoint, its file stem)",
    )
    source = group.add_mutually_exclusive_group()
    source.add_argument(
        "--pretrained", metavar="TAG", help="open_clip pretrained tag (weights must be in the local cache)"
    )
    source.add_argument("--checkpoint", metavar="PATH", help="local open_clip state dict (.pt/.bin/.safetensors)")
    if random_init:
        source.add_argument("--random-init", action="store_true", help="random weights (tests and smoke runs only)")
    group.add_argument(
        "--model-config",
        metavar="JSON",
        help="open_clip model config JSON for an architecture "
        "open_clip does not ship (default with --checkpoint: NAME.json beside it)",
    )
    if models_file:
        group.add_argument(
            "--models-file",
            metavar="JSON",
            default=None,
            help=f"JSON list of model specs to register (default: ${MODELS_FILE_ENV})",
        )


def model_options(args):
    """The group's values as a ModelOptions (the models file falls back to the environment)."""
    from embedsvc.models.registry import ModelOptions

    return ModelOptions(
        model=args.model or "",
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        model_config=args.model_config,
        models_file=getattr(args, "models_file", None) or os.environ.get(MODELS_FILE_ENV) or None,
        random_init=bool(getattr(args, "random_init", False)),
    )


def resolve_model(args, default: str = ""):
    """The ModelSpec the group names, registered so that engines and collections find it by name."""
    from embedsvc.models import DEFAULT_MODEL, spec_from_options

    return spec_from_options(model_options(args), default=default or DEFAULT_MODEL)
