"""Helpers the request-path benchmarks share: a served `embedsvc serve`, test data, alternating slices."""

from __future__ import annotations

import io
import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np


def serve_command(data_dir: str, *extra: str) -> list[str]:
    """`python -m embedsvc serve` on a free local port and `data_dir`: no demo, no metrics, no HTTP (a flag in
    `extra` given again overrides its default here: argparse keeps the last)."""
    return [
        sys.executable,
        "-m",
        "embedsvc",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data_dir,
        "--demo-size",
        "0",
        "--metrics-port",
        "-1",
        "--http-listen",
        "",
        *extra,
    ]


def start_server(
    extra: list[str], data_dir: str, env: dict | None = None, command: list[str] | None = None
) -> tuple[subprocess.Popen, str]:
    """`embedsvc serve` (or `command`, which prints the same "serving on" line) on a free local port;
    returns the process and its address."""
    command = command or serve_command(data_dir, "--log-level", "WARNING", *extra)
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    assert proc.stderr is not None  # stderr=PIPE
    for line in proc.stderr:
        match = re.search(r"serving on \S+:(\d+)", line)
        if match:
            return proc, f"127.0.0.1:{match.group(1)}"
        sys.stderr.write(line)
    raise SystemExit("server did not start")


def model_flags(model: str, folder: str) -> tuple[str, list[str]]:
    """(model name, serve flags): 'bundled' (the default bundled model) or an open_clip architecture with random
    weights. The name is also the server's default, so requests that name no model get it."""
    if model == "bundled":
        from embedsvc.models import DEFAULT_MODEL

        return DEFAULT_MODEL, ["--preload-models", DEFAULT_MODEL, "--default-model", DEFAULT_MODEL]
    name = f"bench-{model}"
    path = Path(folder) / "models.json"
    path.write_text(json.dumps([{"name": name, "architecture": model, "random_init": True}]))
    return name, ["--models-file", str(path), "--preload-models", name, "--default-model", name]


def local_encoder(name: str, model: str):
    from embedsvc.encoder import ClipEncoder
    from embedsvc.models import ModelSpec, get_model_spec, load_model, register_model

    if model != "bundled":
        register_model(ModelSpec(name=name, architecture=model, random_init=True), replace=True)
    return ClipEncoder(load_model(get_model_spec(name)), max_batch=64)


def inputs(n: int, size: int) -> tuple[list[str], list[bytes], list]:
    """n captions, n PNG files of scenes at the model's size, and the decoded images."""
    from embedsvc.datasets import full_caption, generate_scene, render_scene

    scenes = [generate_scene("test", i) for i in range(n)]
    images = [render_scene(s, size) for s in scenes]
    pngs = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return [full_caption(s) for s in scenes], pngs, images


def ms(samples: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    values = np.array(samples) * 1000
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def alternate(systems: dict[str, Callable[[], tuple[float, list[float]]]], reps: int) -> dict[str, list]:
    """Runs each system's slice in turn, `reps` rounds; per system, the (rate, latencies) of each round."""
    out: dict[str, list] = {name: [] for name in systems}
    for _ in range(reps):
        for name, run in systems.items():
            out[name].append(run())
    return out


def ratio_summary(numerator: list[float], denominator: list[float]) -> str:
    """Median of the per-round ratios with their min and max: '0.93 (0.90-0.95)'."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
