"""All five poolings in one request vs cls alone: what extra poolings cost on top of one forward pass.

    python bench/poolings.py [--model bundled] [--inputs 32] [--slice 3] [--reps 3]

One Embed request of --inputs texts (or PNG images) to `embedsvc serve`, asking for cls alone or for
cls, avg, max, gem and spp together, the two alternating in slices of --slice seconds, --reps rounds.
Printed: request latency p50 per variant and the all/cls ratio as median (min-max) of the rounds.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import tempfile
import time

from embedsvc.cpu import apply_openmp_defaults

apply_openmp_defaults()  # before the imports below load OpenMP (E402)

import grpc  # noqa: E402
from common import alternate, inputs, model_flags, ms, ratio_summary, start_server  # noqa: E402

from embedsvc.v1 import embedsvc_pb2 as pb, embedsvc_pb2_grpc as pb_grpc  # noqa: E402

ALL = ("cls", "avg", "max", "gem", "spp")


def slice_of(stub, request, seconds: float):
    latencies: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or not latencies:
        t = time.perf_counter()
        stub.Embed(request, timeout=600)
        latencies.append(time.perf_counter() - t)
    return statistics.median(latencies), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--slice", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        name, flags = model_flags(args.model, folder)
        texts, pngs, _ = inputs(args.inputs, 224 if args.model != "bundled" else 72)
        proc, address = start_server(flags, folder + "/data")
        try:
            with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 1 << 26)]) as channel:
                stub = pb_grpc.EmbedServiceStub(channel)
                print(
                    f"# poolings: {args.model} ({name}), {args.inputs} inputs per request, machine="
                    f"{platform.machine()} cpus={len(os.sched_getaffinity(0))}, slice {args.slice}s x {args.reps}"
                )
                print("| inputs | cls p50/p99 ms | all five p50/p99 ms | all/cls (median of rounds) |")
                print("|---|---|---|---|")
                for modality in ("text", "image"):
                    contents = (
                        [pb.Content(text=t) for t in texts]
                        if modality == "text"
                        else [pb.Content(image=p) for p in pngs]
                    )
                    requests = {
                        variant: pb.EmbedRequest(inputs=contents, poolings=[pb.PoolingSpec(name=n) for n in names])
                        for variant, names in (("cls", ("cls",)), ("all", ALL))
                    }
                    for request in requests.values():
                        slice_of(stub, request, 0)
                    runs = alternate(
                        {v: functools.partial(slice_of, stub, r, args.slice) for v, r in requests.items()}, args.reps
                    )
                    cls_p, all_p = (ms([x for _, lat in runs[v] for x in lat]) for v in ("cls", "all"))
                    ratio = ratio_summary([m for m, _ in runs["all"]], [m for m, _ in runs["cls"]])
                    print(
                        f"| {args.inputs} {modality}s | {cls_p[0]:.2f} / {cls_p[1]:.2f} | {all_p[0]:.2f} / "
                        f"{all_p[1]:.2f} | {ratio} |",
                        flush=True,
                    )
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
