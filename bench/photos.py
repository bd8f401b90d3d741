"""Real photos at the model's speed: a folder of 12-megapixel JPEGs through `embedsvc index --local` and one photo
through Embed, next to floors that decode with DCT scaling and run the same model, alternating in one run.

    python bench/photos.py [--photos 300] [--models bundled,ViT-B-32] [--reps 3] [--requests 60]
                           [--parts decode,index,requests]

The folder (in a temporary directory) holds --photos camera-sized JPEGs (4000x3000, quality 90) made from the
real photos that scikit-image and scikit-learn ship (embedsvc.datasets.photos). Printed, per model:

- decode + preprocess of one photo to the model's input, single thread: a full decode with the model's own
  transform against embedsvc's decode (JPEG DCT scaling, then the transform's geometry), and their ratio;
- `embedsvc index --local` with default flags (batch 64, 4 readers) against a floor that decodes with DCT scaling
  in a thread per CPU (niced as index's readers are) and runs the same model's forward in the same process
  (images/s, start-up excluded), and
  the peak RSS of each (each runs in its own process, measured from a small parent: see MEASURED);
- served Embed of one photo (--requests sequential calls to `embedsvc serve` through embedsvc's Python client,
  as a user makes them: the request built and the vectors read per call), each call followed by its floor in
  this process: the decode floor (in a thread niced as serve's decoders) plus the model's forward at batch 1;
  p50s, and the p50 of the per-call difference (after --warmup untimed calls); and the same call to a server that
  does no work (bench/floor_server.py): what moving the photo through gRPC costs.

The systems take turns, --reps rounds; ratios are medians with the rounds' min-max.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from embedsvc.cpu import apply_openmp_defaults

apply_openmp_defaults()  # as `embedsvc index` and `serve` do, before torch loads: every system runs with it

import numpy as np  # noqa: E402

# Runs argv[1:] and prints its peak RSS: a child's ru_maxrss starts from the high-water mark of the process it is
# forked from, so the measured job is started by this small process rather than by the benchmark (which holds
# models and photos).
MEASURED = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    "print('peak-rss-kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(code)"
)


def register(model: str) -> str:
    """The registry name of 'bundled' or of an open_clip architecture with random weights."""
    from embedsvc.models import DEFAULT_MODEL, ModelSpec, register_model

    if model == "bundled":
        return DEFAULT_MODEL
    return register_model(ModelSpec(name=f"bench-{model}", architecture=model, random_init=True), replace=True).name


# -- child processes -------------------------------------------------------------------------------------------


def child_index(folder: str, model: str, data: str) -> dict:
    """`embedsvc index --local` with default flags, in process; the rate excludes start-up, as the job reports."""
    from embedsvc.jobs.index import IndexJob, run_index

    summary = run_index(
        IndexJob(
            folder, ["photos=cls"], local=data, model=register(model), report=str(Path(data).with_suffix(".jsonl"))
        )
    )
    return {
        "indexed": summary.indexed,
        "failed": len(summary.failed),
        "total": summary.total,
        "rate": summary.indexed / summary.indexing_seconds,
    }


def child_floor(folder: str, model: str) -> dict:
    """Read, DCT-scaled decode and the model's geometry in a thread per CPU; the forward in batches of 64. The
    decode threads are niced as index's readers are, so that other load on the machine weighs on both alike."""
    from PIL import Image

    from embedsvc.cpu import DEFAULT_DECODE_NICE, lower_thread_priority, usable_cpus
    from embedsvc.encoder import ClipEncoder
    from embedsvc.models import get_model_spec, load_model

    encoder = ClipEncoder(load_model(get_model_spec(register(model))), max_batch=64)
    side = encoder.loaded.image_size
    files = sorted(Path(folder).glob("*.jpg"))

    def prepare(path: Path):
        image = Image.open(io.BytesIO(path.read_bytes()))
        image.draft("RGB", (side, side))
        return encoder.prepare(image if image.mode == "RGB" else image.convert("RGB"))

    import torch

    started = time.perf_counter()
    with ThreadPoolExecutor(usable_cpus(), initializer=lower_thread_priority, initargs=(DEFAULT_DECODE_NICE,)) as pool:
        pixels = pool.map(prepare, files)
        batch = []
        for item in pixels:
            batch.append(item)
            if len(batch) == 64:
                encoder.encode_images(torch.stack(batch))
                batch = []
        if batch:
            encoder.encode_images(torch.stack(batch))
    return {"rate": len(files) / (time.perf_counter() - started)}


def run_child(*args: str) -> dict:
    """This script in `--child` mode, through MEASURED; its JSON result with peak_rss_mib added."""
    proc = subprocess.run(
        [sys.executable, "-c", MEASURED, sys.executable, __file__, "--child", *args], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["peak_rss_mib"] = int(proc.stderr.rsplit("peak-rss-kib ", 1)[1]) / 1024
    return result


# -- the parent ------------------------------------------------------------------------------------------------


def build_folder(folder: Path, count: int) -> None:
    from embedsvc.datasets.photos import photo

    folder.mkdir(parents=True)

    def write(i: int) -> None:
        (folder / f"photo-{i:04d}.jpg").write_bytes(photo(i))

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(write, range(count)))


def decode_times(encoder, photos: list[bytes]) -> tuple[list[float], list[float]]:
    """Per photo, seconds of (full decode + the model's whole transform, embedsvc's decode + the transform's
    geometry), alternating photo by photo."""
    from embedsvc.encoder import decode_image

    full, fast = [], []
    for data in photos:
        t = time.perf_counter()
        encoder.loaded.preprocess(decode_image(data))
        full.append(time.perf_counter() - t)
        t = time.perf_counter()
        encoder.prepare(decode_image(data, short_side=encoder.loaded.image_size))
        fast.append(time.perf_counter() - t)
    return full, fast


def request_times(client, rpc_floor, encoder, photos: list[bytes], n: int) -> dict[str, list[float]]:
    """n served Embed calls of one photo through embedsvc's client, each paired with its floors on the same
    photo: the decode floor (DCT-scaled decode + the transform's geometry, in a thread niced as serve's decoders),
    the forward of that one image, and the same call to a server that does no work (`rpc_floor`: what moving the
    photo through gRPC costs). Paired call by call, so that a change in the machine's load weighs on all; the
    served call and the floor take turns going first, so that neither always runs after the other."""
    import torch
    from PIL import Image

    from embedsvc.cpu import DEFAULT_DECODE_NICE, lower_thread_priority

    side = encoder.loaded.image_size

    def decode_one(data: bytes):
        t = time.perf_counter()
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (side, side))
        return encoder.prepare(image if image.mode == "RGB" else image.convert("RGB")), time.perf_counter() - t

    out: dict[str, list[float]] = {"served": [], "decode": [], "forward": [], "rpc": []}

    def served(data: bytes) -> None:
        for key, call in (("served", client), ("rpc", rpc_floor)):
            t = time.perf_counter()
            call.embed([data])
            out[key].append(time.perf_counter() - t)

    def floor(data: bytes) -> None:
        pixels, seconds = pool.submit(decode_one, data).result()
        out["decode"].append(seconds)
        t = time.perf_counter()
        encoder.encode_images(torch.stack([pixels]))
        out["forward"].append(time.perf_counter() - t)

    with ThreadPoolExecutor(1, initializer=lower_thread_priority, initargs=(DEFAULT_DECODE_NICE,)) as pool:
        for k in range(n):
            data = photos[k % len(photos)]
            for system in (served, floor) if k % 2 == 0 else (floor, served):
                system(data)
    return out


def p50_ms(values: list[float]) -> float:
    return float(np.percentile(np.array(values) * 1000, 50))


def span(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def bench_model(model: str, folder: Path, work: Path, photos: list[bytes], args) -> None:
    import torch
    from common import local_encoder, model_flags, start_server

    from embedsvc.client import Client

    name, flags = model_flags(model, str(work))
    encoder = local_encoder(name, model)
    proc, address = start_server(flags, str(work / f"serve-{model}"))
    floor_proc, floor_address = start_server(
        [], "", command=[sys.executable, str(Path(__file__).parent / "floor_server.py"), str(encoder.loaded.embed_dim)]
    )
    try:
        client, rpc_floor = Client(address, timeout=120), Client(floor_address, timeout=120)
        request_times(client, rpc_floor, encoder, photos, args.warmup)  # a server in its steady state
        rounds: dict[str, list] = {
            k: [] for k in ("full", "fast", "index", "floor", "served", "decode", "forward", "rpc", "over", "over_rpc")
        }
        for rep in range(args.reps):
            if "decode" in args.parts:
                full, fast = decode_times(encoder, photos[: args.decodes])
                rounds["full"].append(p50_ms(full))
                rounds["fast"].append(p50_ms(fast))
            if "index" in args.parts:
                rounds["index"].append(run_child("index", str(folder), model, str(work / f"data-{model}-{rep}")))
                rounds["floor"].append(run_child("floor", str(folder), model))
            if "requests" in args.parts:
                calls = request_times(client, rpc_floor, encoder, photos, args.requests)
                for key in ("served", "decode", "forward", "rpc"):
                    rounds[key].append(p50_ms(calls[key]))
                rounds["over"].append(p50_ms([s - d - f for s, d, f, _ in zip(*calls.values())]))
                rounds["over_rpc"].append(p50_ms([s - d - f - r for s, d, f, r in zip(*calls.values())]))
        client.close()
        rpc_floor.close()
    finally:
        for process in (proc, floor_proc):
            process.terminate()
            process.wait(60)
    print(
        f"\n## {model} ({name}, {encoder.loaded.image_size} px), {args.photos} photos of 4000x3000, "
        f"{args.reps} rounds, torch threads {torch.get_num_threads()}, load average {load_average()}"
    )
    print("| figure | embedsvc | reference | comparison |")
    print("|---|---|---|---|")
    if rounds["full"]:
        print(
            f"| decode + preprocess of one photo, p50 ms (reference: full decode + the model's transform) "
            f"| {statistics.median(rounds['fast']):.1f} | {statistics.median(rounds['full']):.1f} "
            f"| {span([b / a for a, b in zip(rounds['fast'], rounds['full'])])}x less |"
        )
    if rounds["index"]:
        print_index(rounds["index"], rounds["floor"])
    if rounds["served"]:
        bounds = [d + f for d, f in zip(rounds["decode"], rounds["forward"])]
        print(
            f"| Embed of one photo, p50 ms (reference: decode floor {statistics.median(rounds['decode']):.1f} + "
            f"forward {statistics.median(rounds['forward']):.1f}) | {statistics.median(rounds['served']):.1f} "
            f"| {statistics.median(bounds):.1f} | {span(rounds['over'])} ms over (paired per call, p50) |"
        )
        print(
            f"| the same call to a server that does no work (bench/floor_server.py), p50 ms; served over decode "
            f"floor + forward + it | {statistics.median(rounds['rpc']):.1f} | | {span(rounds['over_rpc'])} ms "
            f"over |"
        )
    sys.stdout.flush()


def print_index(index: list[dict], floor: list[dict]) -> None:
    print(
        f"| index --local, default flags: indexed / failed of {index[0]['total']} "
        f"| {min(r['indexed'] for r in index)} / {max(r['failed'] for r in index)} | | |"
    )
    print(
        f"| index --local images/s (reference: a floor, DCT-scaled decode + the same model in one process) "
        f"| {statistics.median(r['rate'] for r in index):.1f} | {statistics.median(r['rate'] for r in floor):.1f} "
        f"| {span([a['rate'] / b['rate'] for a, b in zip(index, floor)])} |"
    )
    index_rss, floor_rss = [r["peak_rss_mib"] for r in index], [r["peak_rss_mib"] for r in floor]
    print(
        f"| peak RSS MiB, index --local (reference: the floor) | {statistics.median(index_rss):.0f} "
        f"(max {max(index_rss):.0f}) | {statistics.median(floor_rss):.0f} "
        f"| {span([a / b for a, b in zip(index_rss, floor_rss)])} |"
    )


def load_average() -> str:
    """The machine's 1, 5 and 15-minute load averages: figures from a shared machine are read beside them."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


PARTS = ("decode", "index", "requests")


def parts(text: str) -> tuple[str, ...]:
    chosen = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in chosen if p not in PARTS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}"
        )
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=300, help="12 MP JPEGs in the folder (fewer: a quicker run)")
    parser.add_argument(
        "--models", default="bundled,ViT-B-32", help="'bundled' and/or open_clip architectures with random weights"
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--requests", type=int, default=60, help="sequential Embed calls per round")
    parser.add_argument(
        "--warmup",
        type=int,
        default=100,
        help="untimed calls first: a new server's heap grows over its first ~60 photo calls (150-190 page faults "
        "each), then stays; a served figure without them times a cold server",
    )
    parser.add_argument("--decodes", type=int, default=10, help="photos timed per round for decode + preprocess")
    parser.add_argument(
        "--parts", default=",".join(PARTS), type=parts, help=f"figures to measure, comma-separated: {', '.join(PARTS)}"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        print(json.dumps(child_index(*rest) if kind == "index" else child_floor(*rest)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        build_folder(work / "photos", args.photos)
        print(
            f"# {args.photos} photos built in {time.perf_counter() - started:.0f}s; machine={platform.machine()}, "
            f"{os.cpu_count()} CPUs",
            flush=True,
        )
        photos = [p.read_bytes() for p in sorted((work / "photos").glob("*.jpg"))[: max(args.decodes, 8)]]
        for model in args.models.split(","):
            bench_model(model, work / "photos", work, photos, args)


if __name__ == "__main__":
    main()
