"""`embedsvc embed`: embed texts and images locally and print the vectors."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from embedsvc.cli.models import add_model_arguments, resolve_model
from embedsvc.errors import EmptyText, InvalidInput, quoted


class _AppendInput(argparse.Action):
    """Keeps --text and --image in the order given."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = getattr(namespace, self.dest, None) or []
        items.append((self.const, values))
        setattr(namespace, self.dest, items)


def register(sub) -> None:
    p = sub.add_parser("embed",
                       description="Embed texts and images locally (no server) and print the vectors.")
    add_model_arguments(p, random_init=True)
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda:N")
    p.add_argument("--precision", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    p.add_argument("--pooling", action="append", default=None, metavar="SPEC",
                   help="pooling, repeatable: cls (default), avg, max, gem[:p=3], netvlad, "
                        "spp[:levels=1,2,4;combine=sum]; patch poolings take tokens=final|maskclip|clearclip|"
                        "sclip|naclip (ViT image token mode), e.g. avg:tokens=clearclip")
    p.add_argument("--pooling-state", help="saved NetVLAD state (.safetensors) for the netvlad pooling")
    p.add_argument("--text", dest="inputs", action=_AppendInput, const="text", metavar="TEXT", help="a text (repeatable)")
    p.add_argument("--image", dest="inputs", action=_AppendInput, const="image", metavar="FILE",
                   help="an image file (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON with full float32 vectors")
    p.add_argument("--tokens", action="store_true", help="with --json: include token features")
    p.set_defaults(run=run)


def load_encoder(args):
    from embedsvc.encoder import ClipEncoder
    from embedsvc.models import load_model

    spec = resolve_model(args)
    if spec.random_init:
        print("embedsvc: warning: random-init weights; the vectors carry no meaning", file=sys.stderr)
    return ClipEncoder(load_model(spec, device=args.device, precision=args.precision))


def run(args) -> int:
    from embedsvc.encoder import decode_image, embed
    from embedsvc.pooling import NetVLADState, bind_pooling

    if not args.inputs:
        raise InvalidInput("nothing to embed: give at least one --text or --image")
    specs = args.pooling or ["cls"]
    repeated = next((spec for i, spec in enumerate(specs) if spec in specs[:i]), None)
    if repeated is not None:  # the output keys vectors by spec: a second copy would overwrite the first
        raise InvalidInput(f"--pooling {quoted(repeated)} is given twice; give each spec once")
    state = NetVLADState.load(args.pooling_state) if args.pooling_state else None
    poolings = [bind_pooling(spec, state) for spec in specs]
    inputs = []
    for kind, value in args.inputs:
        if kind == "text":
            if not value.strip():
                raise EmptyText("a --text value is empty: give at least one non-blank character")
            inputs.append(value)
        else:
            path = Path(value)
            if not path.is_file():
                raise InvalidInput(f"image file {path} does not exist")
            inputs.append(decode_image(path.read_bytes()))
    for pooling in poolings:
        pooling.check_ready()
    for modality in {kind for kind, _ in args.inputs}:  # refuse before paying for the model load
        for pooling in poolings:
            pooling.check_modality(modality)
    encoder = load_encoder(args)
    result = embed(encoder, inputs, poolings, keep_features=args.tokens)
    if args.json:
        rows = []
        for i, (kind, value) in enumerate(args.inputs):
            row = {"input": value, "modality": result.modalities[i], "truncated": result.truncated[i],
                   "embeddings": {spec: result.vectors[j][i].tolist() for j, spec in enumerate(specs)}}
            if args.tokens:
                f = result.features[i]
                row["tokens"] = f.tokens[0][f.mask[0]].cpu().tolist()
                row["grid"] = list(f.grid) if f.grid else None
            rows.append(row)
        json.dump({"model": encoder.loaded.spec.name, "results": rows}, sys.stdout)
        sys.stdout.write("\n")
        return 0
    for i, (kind, value) in enumerate(args.inputs):
        for j, spec in enumerate(specs):
            vec = result.vectors[j][i]
            head = ", ".join(f"{v:+.4f}" for v in vec[:6])
            note = " (truncated)" if result.truncated[i] else ""
            print(f"{kind} {value!r}{note} {spec} dim={len(vec)} [{head}, ...]")
    return 0
