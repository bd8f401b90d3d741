"""`embedsvc train`: contrastive training of an open_clip config on scenes or a manifest."""

from __future__ import annotations

import dataclasses
import sys
import typing

from embedsvc.cli.models import add_model_arguments, resolve_model
from embedsvc.training.train import TrainConfig


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        description="Train any open_clip architecture config with the contrastive loss. "
        "Writes NAME.safetensors, NAME.json and model_card.md into --out-dir.",
    )
    p.add_argument("--config", dest="config_file", help="open_clip model config JSON (registered as its file stem)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("config_file", "init"):
            continue
        kind = hints[f.name]
        kind = kind if kind in (int, float) else str
        p.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=f.default, help=f"(default: {f.default})"
        )
    add_model_arguments(
        p,
        flag="--init",
        what="start from this model (architecture and weights) instead of "
        "random weights, e.g. --init embedsvc-tiny-scenes or --checkpoint out/NAME.safetensors",
        default="none: random weights from --config or --architecture",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    import logging

    from embedsvc.training import train

    logging.getLogger("embedsvc").setLevel(logging.INFO)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "init"}
    if args.model or args.pretrained or args.checkpoint:
        values["init"] = resolve_model(args).name
    config = TrainConfig(**values)
    result = train(config)
    for path, reason in result.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    t2i = result.metrics["text_to_image"]
    print(
        f"wrote {result.checkpoint} and {result.config_file}; held-out text->image R@1 {t2i['recall_at_1']:.3f} "
        f"(chance {t2i['chance_recall_at_1']:.3f}) R@10 {t2i['recall_at_10']:.3f} (chance "
        f"{t2i['chance_recall_at_10']:.3f}); {result.seconds / 60:.1f} min; card: {result.card}"
    )
    return 0
