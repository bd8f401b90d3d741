"""Bulk indexing throughput (files on disk -> durable store) next to the raw model forward at the same batch.

    python bench/index_throughput.py [--images 2000] [--batch-size 64] [--workers 2] [--reps 3]

Writes generated scenes as PNG files, runs `embedsvc index --local` on them into one `cls` collection,
then times the bundled model's image forward alone on the same images, preprocessed in memory.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

from embedsvc.cpu import apply_openmp_defaults

apply_openmp_defaults()  # as `embedsvc index` does, before torch loads: both halves run with it

import torch  # noqa: E402


def main() -> None:
    from embedsvc.datasets import generate_scene, render_scene, write_scenes
    from embedsvc.encoder import ClipEncoder
    from embedsvc.jobs.index import IndexJob, run_index
    from embedsvc.models import DEFAULT_MODEL, get_model_spec, load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3, help="rounds of (index, forward)")
    parser.add_argument(
        "--random-arch",
        default="",
        help="index with a random-init open_clip architecture "
        "(e.g. ViT-B-32) instead of the bundled model: a model whose forward dominates",
    )
    args = parser.parse_args()
    from embedsvc.models import ModelSpec, register_model

    model = DEFAULT_MODEL
    if args.random_arch:
        model = register_model(
            ModelSpec(name=f"bench-{args.random_arch}", architecture=args.random_arch, random_init=True)
        ).name
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        size = load_model(get_model_spec(model)).image_size
        write_scenes(root / "src", "val", args.images, size=size)
        for f in (root / "src").glob("manifest.*"):
            f.unlink()
        encoder = ClipEncoder(load_model(get_model_spec(model)), max_batch=args.batch_size)
        pixels = encoder.preprocess([render_scene(generate_scene("val", i), size) for i in range(args.images)])
        encoder.encode_images(pixels[: args.batch_size])
        pipeline_rates, forward_rates = [], []
        for rep in range(args.reps):  # the two alternate, so a slow spell of the machine hits both
            job = IndexJob(
                str(root / "src"),
                ["bench=cls"],
                local=str(root / f"data-{rep}"),
                model=model,
                batch_size=args.batch_size,
                workers=args.workers,
                report=str(root / f"report-{rep}.jsonl"),
            )
            summary = run_index(job)
            assert summary.indexed == args.images, summary
            pipeline_rates.append(args.images / summary.indexing_seconds)
            started = time.perf_counter()
            for start in range(0, args.images, args.batch_size):
                encoder.encode_images(pixels[start : start + args.batch_size])
            forward_rates.append(args.images / (time.perf_counter() - started))
    ratios = [a / b for a, b in zip(pipeline_rates, forward_rates)]
    pipeline_rate, forward_rate = statistics.median(pipeline_rates), statistics.median(forward_rates)
    print(
        f"# bulk indexing vs raw forward: model {model}, {args.images} images, batch {args.batch_size}, "
        f"{args.workers} workers, "
        f"machine={platform.machine()} torch threads={torch.get_num_threads()}"
    )
    print("| stage | images/s |")
    print("|---|---|")
    print(f"| embedsvc index --local (read, decode, embed, fsynced store; start-up excluded) | {pipeline_rate:.0f} |")
    print(f"| model forward alone (preprocessed, in memory) | {forward_rate:.0f} |")
    print(
        f"ratio (median of {args.reps} rounds): {statistics.median(ratios):.2f} "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f})"
    )


if __name__ == "__main__":
    main()
