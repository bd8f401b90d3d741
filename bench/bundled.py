"""Figures of a bundled-model candidate, as docs/models.md reports them: `compare` on held-out scenes (every
pooling, text->image and image->image) and zero-shot on drawings no scenes renderer made.

    python bench/bundled.py embedsvc-tiny-scenes out/v2/embedsvc-tiny-scenes-2.safetensors

Each argument is a registered model name or a checkpoint `embedsvc train` wrote (its NAME.json beside it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

POOLINGS = ("cls", "avg", "max", "gem:p=3", "netvlad:clusters=8", "spp", "avg:tokens=clearclip", "max:tokens=naclip")


def options_of(model: str):
    from embedsvc.models.registry import ModelOptions

    if model.endswith((".safetensors", ".pt", ".bin")):
        return ModelOptions(checkpoint=model)
    return ModelOptions(model=model)


def zero_shot(options, count: int) -> dict:
    from embedsvc.datasets.foreign import foreign_set, prompts_of, zero_shot_scores
    from embedsvc.encoder import ClipEncoder, embed
    from embedsvc.models import load_model, spec_from_options
    from embedsvc.pooling import bind_pooling

    encoder = ClipEncoder(load_model(spec_from_options(options), device="cpu"))
    classes, truth, images = foreign_set(count)
    prompts = prompts_of(classes)
    vectors = embed(encoder, prompts + images, [bind_pooling("cls")]).vectors[0]
    return zero_shot_scores(vectors[len(prompts) :], vectors[: len(prompts)], classes, truth)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--size", type=int, default=1000, help="held-out scenes (default 1000)")
    parser.add_argument("--drawings", type=int, default=300, help="foreign drawings (default 300)")
    args = parser.parse_args()
    from embedsvc.jobs.compare import CompareJob, run_compare

    print(
        "| model | pooling | tokens | t2i R@1 | t2i R@10 | median rank | i2t R@1 | i2i mAP |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    shots = {}
    for model in args.models:
        options = options_of(model)
        with tempfile.TemporaryDirectory() as out:
            result = run_compare(
                CompareJob(
                    data="scenes", size=args.size, poolings=POOLINGS, model=options, out_dir=out, latency_queries=10
                )
            )
        name = result["model"]
        for row in result["poolings"]:
            m = row["metrics"]
            t2i, i2t, i2i = m.get("text_to_image", {}), m.get("image_to_text", {}), m.get("image_to_image", {})
            print(
                f"| {name} | {row['pooling'].split(':tokens=')[0]} | {row['tokens']} | "
                f"{t2i.get('recall_at_1', float('nan')):.3f} | {t2i.get('recall_at_10', float('nan')):.3f} | "
                f"{t2i.get('median_rank', float('nan')):.0f} | {i2t.get('recall_at_1', float('nan')):.3f} | "
                f"{i2i.get('mean_average_precision', float('nan')):.3f} |",
                flush=True,
            )
        chance = m.get("text_to_image", {}).get("chance_recall_at_1")
        print(f"| {name} | chance | | {chance:.3f} | | | | |" if chance is not None else "", flush=True)
        shots[name] = zero_shot(options, args.drawings)
    print(
        f"\nzero-shot on {args.drawings} foreign drawings (joint colour+shape prompts):\n\n"
        "| model | colour+shape top-1 | colour | shape |\n|---|---|---|---|"
    )
    for name, z in shots.items():
        print(f"| {name} | {z['accuracy']:.3f} | {z['colour']:.3f} | {z['shape']:.3f} |")
    z = next(iter(shots.values()))
    print(f"| chance | {z['chance']:.3f} | {z['chance_colour']:.3f} | {z['chance_shape']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
