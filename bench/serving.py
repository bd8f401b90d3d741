"""Request path vs the model's own speed: the raw forward next to served Embed calls, alternating in one run.

    python bench/serving.py [--models bundled,ViT-B-32] [--slice 3] [--reps 3] [--modalities text,image]
    python bench/serving.py --contention [--models bundled]
    python bench/serving.py --floor [--models bundled]
    python bench/serving.py --versus "--decode-nice 10" [--models bundled]
    python bench/serving.py --frontends 1,2,4 --floor --raw-decode [--models bundled]

--floor adds a third system, a server that does no work (bench/floor_server.py): the transport's own
cost. On a machine where the forward and the RPCs share the CPUs, served/raw cannot exceed
floor/(raw + floor) (one item costs 1/raw of CPU in the forward plus 1/floor in the RPC); the
table prints that bound beside the measured ratio. --versus FLAGS adds a second `embedsvc serve` started with
those extra flags (words NAME=VALUE: environment variables, e.g. --versus GOMP_SPINCOUNT=10000), alternating
with the first: an A/B of a server setting in one run. --frontends N,... adds `embedsvc serve --frontends N` per
N (embedsvc.service.frontends), and with --floor the floor of each: the same front ends before a model process
that does no work. --raw-decode makes the raw image side decode the PNGs and prepare them too (one thread), as
the server must. --cpu adds what each item costs in CPU: the raw forward's (this process), the client's (this
process during served slices: 32 asyncio callers of grpc.aio) and each server's (its process tree), and the ratio
the machine allows even for a server that cost nothing: cores / ((raw + client CPU per item) x raw items/s).

Cases are callers x inputs per request: 1x1, 8x1, 32x1 and 1x32. For each, the raw forward (the same model
in this process, preprocessed pixels or tokenized-in-the-call texts, at batch callers*inputs) and the server
(`embedsvc serve` on a local port; images sent as PNG bytes, decoded by the server) take turns in slices
of --slice seconds, --reps rounds. Printed: items/s medians, the served/raw ratio as median (min-max)
of the rounds, p50/p99 latency of a raw forward and of a served request.

--contention: the served 32x1 throughput with a busy process pinned to one core, over the quiet figure,
for the default OpenMP wait policy (PASSIVE, set by `embedsvc serve`) and for OMP_WAIT_POLICY=ACTIVE.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from embedsvc.cpu import apply_openmp_defaults

apply_openmp_defaults()  # the raw forward runs with the threads the server gets

import grpc  # noqa: E402
import torch  # noqa: E402
from common import alternate, inputs, local_encoder, model_flags, ms, ratio_summary, start_server  # noqa: E402

from embedsvc.v1 import embedsvc_pb2 as pb, embedsvc_pb2_grpc as pb_grpc  # noqa: E402

CASES = ((1, 1), (8, 1), (32, 1), (1, 32))
# --contention's OpenMP settings of the server: the passive default, spinning, and a short bounded spin
# (libgomp spins GOMP_SPINCOUNT times before it sleeps; an explicit policy in the environment wins over serve's).
POLICIES = {
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"},
    "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE", "KMP_BLOCKTIME": "200"},
    "SPIN10K": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "0"},
}


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its descendants (front ends, body workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, (ppid, _) in stats.items() if ppid == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(stats[p][1] for p in tree if p in stats)


def with_cpu(run: Callable[[], tuple[float, list[float]]], server_pid: int | None, sink: list):
    """`run`, appending (items, this process's CPU s, the server tree's CPU s) of the slice to `sink`."""

    def measured() -> tuple[float, list[float]]:
        wall, mine, theirs = time.perf_counter(), time.process_time(), tree_cpu_seconds(server_pid or 0)
        rate, latencies = run()
        items = rate * (time.perf_counter() - wall)
        sink.append((items, time.process_time() - mine, tree_cpu_seconds(server_pid or 0) - theirs))
        return rate, latencies

    return measured


def cpu_columns(cpu: dict, runs: dict, keys: list[str]) -> str:
    """us of CPU per item: raw, client (during the first served system's slices), each server; and the bound."""

    def per_item(key: str, column: int) -> float:
        return 1e6 * sum(r[column] for r in cpu[key]) / max(sum(r[0] for r in cpu[key]), 1e-9)

    raw_us, client_us = per_item("raw", 1), per_item("served", 1)
    raw_rate = statistics.median(r for r, _ in runs["raw"])
    bound = len(os.sched_getaffinity(0)) * 1e6 / ((raw_us + client_us) * raw_rate)
    return (
        f" {raw_us:.0f} | {client_us:.0f} | "
        + " | ".join(f"{per_item(k, 2):.0f}" for k in keys)
        + f" | {min(bound, 1.0):.2f} |"
    )


def raw_slice(encoder, modality: str, texts, pixels, batch: int, seconds: float, pngs=None):
    """The model alone at `batch`; with `pngs`, images are decoded and prepared in the slice, as served."""
    from embedsvc.encoder.images import decode_image

    latencies: list[float] = []
    items = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or not latencies:
        t = time.perf_counter()
        if modality == "text":
            encoder.encode_texts(texts[:batch])
        elif pngs is not None:
            size = encoder.loaded.image_size
            encoder.encode_images(
                torch.stack([encoder.prepare(decode_image(p, short_side=size)) for p in (pngs * batch)[:batch]])
            )
        else:
            encoder.encode_images(pixels[:batch])
        latencies.append(time.perf_counter() - t)
        items += batch
    return items / (time.perf_counter() - started), latencies


async def served_slice(stub, requests: list, seconds: float):
    latencies: list[float] = []
    items = 0
    started = time.perf_counter()

    async def caller(request):
        nonlocal items
        while time.perf_counter() - started < seconds or not latencies:
            t = time.perf_counter()
            await stub.Embed(request, timeout=600)
            latencies.append(time.perf_counter() - t)
            items += len(request.inputs)

    await asyncio.gather(*(caller(r) for r in requests))
    return items / (time.perf_counter() - started), latencies


def served_blocking(loop, stub, requests: list, seconds: float):
    """served_slice run to completion on `loop`."""
    return loop.run_until_complete(served_slice(stub, requests, seconds))


def requests_for(modality: str, texts, pngs, callers: int, per: int) -> list:
    def content(i):
        return pb.Content(text=texts[i]) if modality == "text" else pb.Content(image=pngs[i])

    return [pb.EmbedRequest(inputs=[content((c * per + j) % len(texts)) for j in range(per)]) for c in range(callers)]


def compare(model: str, args) -> None:
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        name, flags = model_flags(model, folder)
        encoder = local_encoder(name, model)
        texts, pngs, images = inputs(64, encoder.loaded.image_size)
        pixels = encoder.preprocess(images)
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        stack.callback(loop.close)

        pids: dict[int, int] = {}  # order of start -> server pid (the stubs dict keeps the same order)

        def stub_of(command: list[str] | None, extra: list[str], data: str):
            """A started server's stub; the server stops and its channel closes when the block ends. Words of
            `extra` shaped NAME=VALUE set the server's environment, the others are flags."""
            env = dict(w.split("=", 1) for w in extra if re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w))
            proc, address = start_server(
                flags + [w for w in extra if w.split("=", 1)[0] not in env], data, env=env, command=command
            )
            stack.callback(_stop, proc)
            pids[len(pids)] = proc.pid
            channel = grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 1 << 26)])
            stack.callback(lambda: loop.run_until_complete(channel.close(None)))
            return pb_grpc.EmbedServiceStub(channel)

        stubs = {"served": stub_of(None, [], folder + "/data")}
        if args.versus:
            stubs["versus"] = stub_of(None, shlex.split(args.versus), folder + "/data-versus")
        floor_command = [sys.executable, str(Path(__file__).parent / "floor_server.py"), str(encoder.loaded.embed_dim)]
        if args.floor:
            stubs["floor"] = stub_of(floor_command, [], "")
        models_file = flags[flags.index("--models-file") + 1] if "--models-file" in flags else ""
        for n in frontend_counts(args.frontends):
            stubs[f"fe{n}"] = stub_of(None, ["--frontends", str(n)], f"{folder}/data-fe{n}")
            if args.floor:
                stubs[f"floor-fe{n}"] = stub_of(
                    [*floor_command, "--frontends", str(n), "--model", name, "--models-file", models_file], [], ""
                )
        extra = [k for k in stubs if k.startswith(("fe", "floor-fe"))]
        server_pid = dict(zip(stubs, pids.values()))
        print(f"\n## {model} ({name}), torch threads {torch.get_num_threads()}, slice {args.slice}s x {args.reps}")
        print(
            "| case (callers x inputs) | raw items/s | served items/s | served/raw | raw p50/p99 ms "
            "| served p50/p99 ms |"
            + (" floor items/s | floor p50 ms | bound floor/(raw+floor) |" if args.floor else "")
            + (f" items/s with {args.versus} | with/without |" if args.versus else "")
            + "".join(f" {k} items/s | {k}/raw | {k} p50 ms |" for k in extra)
            + (
                " raw CPU us/item | client CPU us/item | "
                + " | ".join(f"{k} server CPU us/item" for k in stubs)
                + " | bound by raw + client CPU |"
                if args.cpu
                else ""
            )
        )
        print(
            "|---|---|---|---|---|---|"
            + ("---|---|---|" if args.floor else "")
            + ("---|---|" if args.versus else "")
            + "---|---|---|" * len(extra)
            + ("---|" * (len(stubs) + 3) if args.cpu else "")
        )
        for modality in args.modalities.split(","):
            for callers, per in selected_cases(args.cases):
                batch = callers * per
                reqs = requests_for(modality, texts, pngs, callers, per)
                raw_slice(encoder, modality, texts, pixels, batch, 0)  # warm every system
                raw_pngs = pngs if args.raw_decode else None
                systems: dict[str, Callable[[], tuple[float, list[float]]]] = {
                    "raw": functools.partial(raw_slice, encoder, modality, texts, pixels, batch, args.slice, raw_pngs)
                }
                for key, stub in stubs.items():
                    loop.run_until_complete(served_slice(stub, reqs, 0))
                    systems[key] = functools.partial(served_blocking, loop, stub, reqs, args.slice)
                cpu: dict[str, list] = {key: [] for key in systems}
                if args.cpu:
                    systems = {k: with_cpu(run, server_pid.get(k), cpu[k]) for k, run in systems.items()}
                runs = alternate(systems, args.reps)
                raw_rates, served_rates = [r for r, _ in runs["raw"]], [r for r, _ in runs["served"]]
                raw_lat = ms([x for _, lat in runs["raw"] for x in lat])
                served_lat = ms([x for _, lat in runs["served"] for x in lat])
                print(
                    f"| {modality} {callers}x{per} | {statistics.median(raw_rates):.0f} "
                    f"| {statistics.median(served_rates):.0f} | {ratio_summary(served_rates, raw_rates)} "
                    f"| {raw_lat[0]:.2f} / {raw_lat[1]:.2f} | {served_lat[0]:.2f} / {served_lat[1]:.2f} |"
                    + (floor_columns(runs) if args.floor else "")
                    + (versus_columns(runs) if args.versus else "")
                    + "".join(extra_columns(runs, k) for k in extra)
                    + (cpu_columns(cpu, runs, list(stubs)) if args.cpu else ""),
                    flush=True,
                )
        print(f"load average during the run (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def selected_cases(spec: str) -> list[tuple[int, int]]:
    """CASES, or those named in `spec` ("32x1,1x32"); an unknown name is an error, not a silent skip."""
    if not spec:
        return list(CASES)
    names = {f"{c}x{p}": (c, p) for c, p in CASES}
    unknown = [n for n in spec.split(",") if n not in names]
    if unknown:
        raise SystemExit(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(names)}")
    return [names[n] for n in spec.split(",")]


def floor_columns(runs: dict) -> str:
    raw, floor = ([r for r, _ in runs[k]] for k in ("raw", "floor"))
    bounds = [f / (r + f) for r, f in zip(raw, floor)]
    return (
        f" {statistics.median(floor):.0f} | {ms([x for _, lat in runs['floor'] for x in lat])[0]:.2f} "
        f"| {statistics.median(bounds):.2f} |"
    )


def frontend_counts(spec: str) -> list[int]:
    """--frontends "1,2,4" as numbers; anything else is an error, not a silent skip."""
    if not spec:
        return []
    if not re.fullmatch(r"\d+(,\d+)*", spec) or "0" in spec.split(","):
        raise SystemExit(f"--frontends: expected counts of front ends like 1,2,4, got {spec!r}")
    return [int(n) for n in spec.split(",")]


def extra_columns(runs: dict, key: str) -> str:
    rates, raw = [r for r, _ in runs[key]], [r for r, _ in runs["raw"]]
    return (
        f" {statistics.median(rates):.0f} | {ratio_summary(rates, raw)} "
        f"| {ms([x for _, lat in runs[key] for x in lat])[0]:.2f} |"
    )


def versus_columns(runs: dict) -> str:
    served, versus = ([r for r, _ in runs[k]] for k in ("served", "versus"))
    return f" {statistics.median(versus):.0f} | {ratio_summary(versus, served)} |"


def contention(model: str, args) -> None:
    """Quiet vs one core busy, alternating, for each wait policy."""
    busy = subprocess.Popen([sys.executable, "-c", "import os\nos.sched_setaffinity(0, {0})\nwhile True: pass"])
    os.kill(busy.pid, signal.SIGSTOP)
    try:
        print(
            f"\n## contention: {model}, 32 callers x 1 input, a busy process pinned to core 0 "
            f"(usable CPUs {len(os.sched_getaffinity(0))}), slice {args.slice}s x {args.reps}"
        )
        print("| server OpenMP wait policy | modality | quiet items/s | busy-core items/s | busy/quiet |")
        print("|---|---|---|---|---|")
        for policy in args.policies.split(","):
            with tempfile.TemporaryDirectory() as folder:
                _, flags = model_flags(model, folder)
                texts, pngs, _ = inputs(64, 224 if model != "bundled" else 72)
                proc, address = start_server(flags, folder + "/data", env=POLICIES[policy])
                loop = asyncio.new_event_loop()
                asyncio.set_event_loop(loop)
                channel = grpc.aio.insecure_channel(address)
                stub = pb_grpc.EmbedServiceStub(channel)

                def slice_with(competing: bool, reqs, loop=loop, stub=stub):
                    os.kill(busy.pid, signal.SIGCONT if competing else signal.SIGSTOP)
                    try:
                        return loop.run_until_complete(served_slice(stub, reqs, args.slice))
                    finally:
                        os.kill(busy.pid, signal.SIGSTOP)

                try:
                    for modality in args.modalities.split(","):
                        reqs = requests_for(modality, texts, pngs, 32, 1)
                        loop.run_until_complete(served_slice(stub, reqs, 0))
                        runs = alternate(
                            {
                                "quiet": functools.partial(slice_with, False, reqs),
                                "busy": functools.partial(slice_with, True, reqs),
                            },
                            args.reps,
                        )
                        quiet, loaded = [r for r, _ in runs["quiet"]], [r for r, _ in runs["busy"]]
                        print(
                            f"| {policy} | {modality} | {statistics.median(quiet):.0f} "
                            f"| {statistics.median(loaded):.0f} | {ratio_summary(loaded, quiet)} |",
                            flush=True,
                        )
                finally:
                    loop.run_until_complete(channel.close(None))
                    proc.terminate()
                    proc.wait(60)
    finally:
        busy.kill()
        busy.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default="bundled,ViT-B-32", help="'bundled' and/or open_clip architectures (random weights)"
    )
    parser.add_argument("--modalities", default="text,image")
    parser.add_argument("--slice", type=float, default=3.0, help="seconds per system per round")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--contention", action="store_true")
    parser.add_argument(
        "--policies", default="PASSIVE,ACTIVE", help=f"--contention's server OpenMP settings, of {', '.join(POLICIES)}"
    )
    parser.add_argument("--floor", action="store_true", help="also time a server that does no work")
    parser.add_argument("--versus", default="", help="extra `embedsvc serve` flags of a second server to A/B")
    parser.add_argument("--cases", default="", help="only these cases, e.g. 32x1,1x32")
    parser.add_argument("--frontends", default="", help="also `embedsvc serve --frontends N` for each N, e.g. 1,2,4")
    parser.add_argument("--raw-decode", action="store_true", help="the raw image side decodes the PNGs too")
    parser.add_argument("--cpu", action="store_true", help="CPU per item of the forward, the client and each server")
    args = parser.parse_args()
    unknown = [p for p in args.policies.split(",") if p not in POLICIES]
    if unknown:
        parser.error(f"--policies: unknown {', '.join(unknown)}; choose from {', '.join(POLICIES)}")
    print(
        f"# served vs raw forward: machine={platform.machine()} cpus={len(os.sched_getaffinity(0))} "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )
    for model in args.models.split(","):
        (contention if args.contention else compare)(model, args)


if __name__ == "__main__":
    main()
