"""Encoder throughput on the GPU (fp16, batched) next to the CPU (fp32), for the bundled model or any spec.

    python bench/gpu_embed.py [--model embedsvc-tiny-scenes-2] [--batches 1,8,32,128,512] [--seconds 3]

Prints images/s and texts/s per device and batch size, and the largest |fp16 - fp32| cosine gap.
Without CUDA it measures the CPU only and says so; serving on GPU needs no flag (device "auto").
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import torch.nn.functional as F

from embedsvc.datasets import full_caption, generate_scene, render_scene
from embedsvc.encoder import ClipEncoder
from embedsvc.models import DEFAULT_MODEL, get_model_spec, load_model


def rate(fn, n: int, seconds: float, sync) -> float:
    fn()
    sync()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        count += n
    sync()
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batches", default="1,8,32,128,512")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    spec = get_model_spec(args.model)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if len(devices) == 1:
        print("# no CUDA device here: CPU figures only (run on a GPU machine for the fp16 path)")
    else:
        print(f"# GPU: {torch.cuda.get_device_name(0)}")
    encoders = {d: ClipEncoder(load_model(spec, device=d), max_batch=4096) for d in devices}
    biggest = max(int(b) for b in args.batches.split(","))
    scenes = [generate_scene("test", i) for i in range(biggest)]
    size = encoders["cpu"].loaded.image_size
    pixels = encoders["cpu"].preprocess([render_scene(s, size) for s in scenes])
    texts = [full_caption(s) for s in scenes]
    print("| device | dtype | batch | images/s | texts/s |")
    print("|---|---|---|---|---|")
    for device, encoder in encoders.items():
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for batch in (int(b) for b in args.batches.split(",")):
            images = rate(functools.partial(encoder.encode_images, pixels[:batch]), batch, args.seconds, sync)
            text_rate = rate(functools.partial(encoder.encode_texts, texts[:batch]), batch, args.seconds, sync)
            dtype = str(encoder.dtype).replace("torch.", "")
            print(f"| {device} | {dtype} | {batch} | {images:,.0f} | {text_rate:,.0f} |", flush=True)
    if "cuda" in encoders:
        a = F.normalize(encoders["cpu"].encode_images(pixels[:256]).native, dim=-1)
        b = F.normalize(encoders["cuda"].encode_images(pixels[:256]).native.cpu(), dim=-1)
        print(f"min cosine(fp16 GPU, fp32 CPU) over 256 images: {(a * b).sum(-1).min().item():.5f}")


if __name__ == "__main__":
    main()
