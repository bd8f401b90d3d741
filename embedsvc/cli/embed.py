"""`embedsvc embed`: embed texts and images, locally or through a server (--address), and print the vectors."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from embedsvc.cli import connect
from embedsvc.cli.models import add_model_arguments, resolve_model
from embedsvc.errors import EmptyText, InvalidInput, quoted

if TYPE_CHECKING:  # numpy loads with the model or the client, not for --help
    import numpy as np


class _AppendInput(argparse.Action):
    """Keeps --text and --image in the order given."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = getattr(namespace, self.dest, None) or []
        items.append((self.const, values))
        setattr(namespace, self.dest, items)


def register(sub) -> None:
    p = sub.add_parser(
        "embed",
        description="Embed texts and images and print the vectors: locally (the model loads in this "
        "process), or through a running server with --address.",
    )
    p.add_argument(
        "--address",
        nargs="?",
        const=connect.default_address(),
        default=None,
        metavar="HOST:PORT",
        help="embed through the server at this address instead of loading the model here; --address "
        f"alone: ${connect.ADDRESS_ENV}, else {connect.DEFAULT_ADDRESS} (the API token comes from "
        f"${connect.TOKEN_ENV})",
    )
    add_model_arguments(p, random_init=True)
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda:N")
    p.add_argument("--precision", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    p.add_argument(
        "--pooling",
        action="append",
        default=None,
        metavar="SPEC",
        help="pooling, repeatable: cls (default), avg, max, gem[:p=3], netvlad, "
        "spp[:levels=1,2,4;combine=sum]; patch poolings take tokens=final|maskclip|clearclip|"
        "sclip|naclip (ViT image token mode), e.g. avg:tokens=clearclip",
    )
    p.add_argument("--pooling-state", help="saved NetVLAD state (.safetensors) for the netvlad pooling")
    p.add_argument(
        "--text", dest="inputs", action=_AppendInput, const="text", metavar="TEXT", help="a text (repeatable)"
    )
    p.add_argument(
        "--image", dest="inputs", action=_AppendInput, const="image", metavar="FILE", help="an image file (repeatable)"
    )
    p.add_argument("--json", action="store_true", help="print JSON with full float32 vectors")
    p.add_argument("--tokens", action="store_true", help="with --json: include token features")
    p.set_defaults(run=run)


@dataclass
class Row:
    """One input's result, whichever way it was embedded."""

    modality: str
    truncated: bool
    vectors: list[tuple[str, np.ndarray]]  # (spec as given, vector) per --pooling, in order
    tokens: np.ndarray | None = None  # [num_tokens, dim], with --tokens
    grid: tuple[int, int] | None = None  # image token grid, with --tokens


def load_encoder(args, spec=None):
    from embedsvc.encoder import ClipEncoder
    from embedsvc.models import load_model

    spec = spec or resolve_model(args)
    if spec.random_init:
        print("embedsvc: warning: random-init weights; the vectors carry no meaning", file=sys.stderr)
    return ClipEncoder(load_model(spec, device=args.device, precision=args.precision))


def _inputs(args) -> list[tuple[str, object]]:
    """(kind, text or image bytes) per --text/--image, checked before any model loads or call is made."""
    if not args.inputs:
        raise InvalidInput("nothing to embed: give at least one --text or --image")
    inputs = []
    for kind, value in args.inputs:
        if kind == "text":
            if not value.strip():
                raise EmptyText("a --text value is empty: give at least one non-blank character")
            inputs.append((kind, value))
        else:
            path = Path(value)
            if not path.is_file():
                raise InvalidInput(f"image file {path} does not exist")
            inputs.append((kind, path.read_bytes()))
    return inputs


def _specs(args) -> list[str]:
    """The --pooling specs in order (cls when none); a spec given twice is refused, since the output keys
    vectors by spec and a second copy would overwrite the first."""
    specs = args.pooling or ["cls"]
    repeated = next((spec for i, spec in enumerate(specs) if spec in specs[:i]), None)
    if repeated is not None:
        raise InvalidInput(f"--pooling {quoted(repeated)} is given twice; give each spec once")
    return specs


def _embed_local(args, inputs, specs) -> tuple[str, list[Row]]:
    from embedsvc.encoder import decode_image, embed
    from embedsvc.models import input_size
    from embedsvc.pooling import NetVLADState, bind_pooling

    state = NetVLADState.load(args.pooling_state) if args.pooling_state else None
    poolings = [bind_pooling(spec, state) for spec in specs]
    for pooling in poolings:
        pooling.check_ready()
    for modality in {kind for kind, _ in inputs}:  # refuse before paying for the model load
        for pooling in poolings:
            pooling.check_modality(modality)
    model_spec = resolve_model(args)
    side = input_size(model_spec) if any(kind == "image" for kind, _ in inputs) else 0  # decode at the model's size
    decoded = [value if kind == "text" else decode_image(value, short_side=side) for kind, value in inputs]
    encoder = load_encoder(args, model_spec)
    result = embed(encoder, decoded, poolings, keep_features=args.tokens)
    rows = []
    for i in range(len(inputs)):
        row = Row(
            result.modalities[i], result.truncated[i], [(spec, result.vectors[j][i]) for j, spec in enumerate(specs)]
        )
        if args.tokens:
            f = result.features[i]
            row.tokens, row.grid = f.tokens[0][f.mask[0]].cpu().numpy(), f.grid
        rows.append(row)
    return encoder.loaded.spec.name, rows


# Options that shape a local model load; a server loads its own models, so with --address they are refused.
LOCAL_ONLY = {
    "pretrained": "--pretrained",
    "checkpoint": "--checkpoint",
    "model_config": "--model-config",
    "models_file": "--models-file",
    "random_init": "--random-init",
    "pooling_state": "--pooling-state",
}


def _embed_remote(args, inputs, specs) -> tuple[str, list[Row]]:
    given = [flag for key, flag in LOCAL_ONLY.items() if getattr(args, key, None)]
    given += [f"--{key} {getattr(args, key)}" for key in ("device", "precision") if getattr(args, key) != "auto"]
    if given:
        raise InvalidInput(
            f"{', '.join(given)} shape a model loaded in this process; with --address the server "
            f"embeds with its own models (--model NAME picks one of them): drop --address to embed "
            f"here, or drop {given[0].split()[0]}"
        )
    with connect.client(args.address) as client:
        result = client.embed([value for _, value in inputs], specs, model=args.model, include_tokens=args.tokens)
    rows = [
        Row(result.modalities[i], result.truncated[i], [(spec, result.vectors[spec][i]) for spec in specs])
        for i in range(len(inputs))
    ]
    if args.tokens:
        for row, tokens, grid in zip(rows, result.tokens, result.grids):
            row.tokens, row.grid = tokens, grid
    return result.model, rows


def run(args) -> int:
    inputs, specs = _inputs(args), _specs(args)
    model, rows = _embed_remote(args, inputs, specs) if args.address else _embed_local(args, inputs, specs)
    if args.json:
        out = []
        for (_kind, value), row in zip(args.inputs, rows):
            item = {
                "input": value,
                "modality": row.modality,
                "truncated": row.truncated,
                "embeddings": {name: vector.tolist() for name, vector in row.vectors},
            }
            if args.tokens:
                assert row.tokens is not None  # asked for: every row has them
                item["tokens"] = row.tokens.tolist()
                item["grid"] = list(row.grid) if row.grid else None
            out.append(item)
        json.dump({"model": model, "results": out}, sys.stdout)
        sys.stdout.write("\n")
        return 0
    for (kind, value), row in zip(args.inputs, rows):
        for name, vec in row.vectors:
            head = ", ".join(f"{v:+.4f}" for v in vec[:6])
            note = " (truncated)" if row.truncated else ""
            print(f"{kind} {value!r}{note} {name} dim={len(vec)} [{head}, ...]")
    return 0
