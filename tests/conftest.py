"""Shared fixtures: real open_clip models with random weights saved as local checkpoint files."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: tests must never reach a hub
if os.environ.get("PYTEST_XDIST_WORKER"):  # one core per worker: workers side by side must not oversubscribe
    torch.set_num_threads(1)

TINY_ARCH = "embedsvc-test-tiny-vit"
TINY_RN_ARCH = "embedsvc-test-tiny-rn"
TINY_VIT_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_RN_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def pytest_addoption(parser):
    parser.addoption(
        "--store-backend",
        choices=("local", "milvus"),
        default=os.environ.get("EMBEDSVC_TEST_STORE_BACKEND", "local"),
        help="store back end of the in-process servers (tests/serving.py): milvus runs them on Milvus Lite",
    )


def pytest_configure(config):
    import serving

    serving.STORE_BACKEND = config.getoption("--store-backend")


# Files whose few tests run long (a model, a server process, Milvus Lite, a fuzz), longest first, from
# `--durations=0` on a 2-core machine. pytest-xdist's loadfile hands out files with the most tests first, which left
# the longest single-test files (the fuzz, the e2e, the kills) for last: one worker ended alone with them.
# Handed out first instead (longest processing time first), the many short files fill the gaps at the end.
# The order only moves time; a missing or renamed file here changes no verdict.
LONG_FILES = (
    "test_http_dos.py",
    "test_photos.py",
    "test_milvus_replicas.py",
    "test_fuzz_rpcs.py",
    "test_frontends.py",
    "test_backend_congruence.py",
    "test_index_job.py",
    "test_service_e2e.py",
    "test_integrity_data.py",
    "test_web_page.py",
    "test_bundled_model.py",
    "test_token_modes.py",
    "test_service_kill.py",
    "test_http_readme.py",
    "test_store_congruence.py",
    "test_compare_manifest.py",
)


def pytest_xdist_make_scheduler(config, log):
    """With --dist loadfile: the long files first (LONG_FILES), then xdist's own order."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongFilesFirst(LoadFileScheduling):
        ordered = False

        def _assign_work_unit(self, node):
            if not self.ordered:
                self.ordered = True
                rank = {name: k for k, name in enumerate(LONG_FILES)}
                queue = sorted(self.workqueue.items(), key=lambda kv: rank.get(Path(kv[0]).name, len(rank)))
                self.workqueue.clear()
                self.workqueue.update(queue)
            super()._assign_work_unit(node)

    return LongFilesFirst(config, log)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _save_random(arch: str, path: Path, seed: int = 0) -> Path:
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(arch)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def _tiny_spec(model_dir: Path, arch: str, config: dict, suffix: str = ".pt"):
    import open_clip

    from embedsvc.models import ModelSpec

    config_file = model_dir / f"{arch}.json"
    config_file.write_text(json.dumps(config))
    open_clip.add_model_config(str(config_file))
    checkpoint = _save_random(arch, model_dir / f"{arch}{suffix}")
    return ModelSpec(name=arch, architecture=arch, checkpoint=str(checkpoint), config_file=str(config_file))


@pytest.fixture(scope="session")
def tiny_spec(model_dir):
    """A 2-layer ViT CLIP (32 px, 4x4 patch grid, 32-d joint space) from a local checkpoint."""
    return _tiny_spec(model_dir, TINY_ARCH, TINY_VIT_CONFIG)


@pytest.fixture(scope="session")
def tiny_rn_spec(model_dir):
    """A small ModifiedResNet CLIP (64 px, 2x2 grid) from a local .safetensors checkpoint."""
    return _tiny_spec(model_dir, TINY_RN_ARCH, TINY_RN_CONFIG, ".safetensors")


@pytest.fixture(scope="module")
def make_server(request, tmp_path_factory):
    """The suite's server factory: `make_server(**overrides)` starts a real server on 127.0.0.1 (free ports) for the
    module's tests and returns its serving.ServerThread; every one is stopped when the module's tests end.

    The tiny test model (tiny_spec) is its default model, no HTTP unless http_listen="127.0.0.1:0"
    (serving.tiny_config); `bundled=True` serves the bundled default model instead (serving.bundled_config).
    Each server gets a fresh data_dir unless `data_dir` is given; the other keywords are ServerConfig fields."""
    import serving

    with contextlib.ExitStack() as started:

        def start(bundled: bool = False, demo: bool = False, **overrides) -> serving.ServerThread:
            data_dir = overrides.pop("data_dir", None) or tmp_path_factory.mktemp("server")
            if bundled:
                return started.enter_context(
                    serving.running_server(serving.bundled_config(data_dir, **overrides), demo)
                )
            spec = request.getfixturevalue("tiny_spec")
            return started.enter_context(serving.tiny_server(spec, data_dir, demo=demo, **overrides))

        yield start


@pytest.fixture
def client(server):
    """A gRPC client of the module's `server` fixture (one made by `make_server`)."""
    from embedsvc.client import Client

    with Client(server.address, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def tiny_encoder(tiny_spec):
    from embedsvc.encoder import ClipEncoder
    from embedsvc.models import load_model

    return ClipEncoder(load_model(tiny_spec))


@pytest.fixture(scope="session")
def bundled_encoder():
    """The default bundled model (v2), on the CPU in fp32 as the server runs it there."""
    from embedsvc.encoder import ClipEncoder
    from embedsvc.models import DEFAULT_MODEL, get_model_spec, load_model

    return ClipEncoder(load_model(get_model_spec(DEFAULT_MODEL), device="cpu", precision="fp32"))


@pytest.fixture(scope="session")
def vit_b32_checkpoint(model_dir) -> Path:
    return _save_random("ViT-B-32", model_dir / "ViT-B-32.pt", seed=1)


@pytest.fixture(scope="session")
def vit_b32(vit_b32_checkpoint):
    """ViT-B-32 with random weights from a .pt checkpoint: a full-size ViT, loaded once (3-4 s) for every module."""
    from embedsvc.encoder import ClipEncoder
    from embedsvc.models import load_model, resolve_model_spec

    return ClipEncoder(load_model(resolve_model_spec("ViT-B-32", checkpoint=str(vit_b32_checkpoint))))


@pytest.fixture(scope="session")
def rn50_checkpoint(model_dir) -> Path:
    return _save_random("RN50", model_dir / "RN50.safetensors", seed=2)


def png_bytes(size=(48, 40), color=(200, 30, 30), mode="RGB", fmt="PNG", **save_kwargs) -> bytes:
    import io

    from PIL import Image, ImageDraw

    image = Image.new(mode, size, color)
    ImageDraw.Draw(image).ellipse((4, 4, size[0] // 2, size[1] // 2), fill=(20, 20, 220) if mode == "RGB" else None)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()
