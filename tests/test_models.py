"""Model registry and loading: local files only, clear errors for everything that can be missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedsvc.encoder import ClipEncoder
from embedsvc.errors import InvalidInput, UnknownModel, WeightsUnavailable
from embedsvc.models import (
    MODEL_REGISTRY,
    ModelSpec,
    get_model_spec,
    load_model,
    register_model,
    resolve_device,
    resolve_model_spec,
    resolve_precision,
)


def test_unknown_registry_name():
    with pytest.raises(UnknownModel, match="--checkpoint"):
        get_model_spec("no-such-model")


def test_unknown_architecture():
    with pytest.raises(UnknownModel, match="open_clip architecture"):
        resolve_model_spec("ViT-Nope", checkpoint="/tmp/x.pt")


def test_missing_checkpoint_says_how_to_supply_one(tmp_path):
    spec = resolve_model_spec("ViT-B-32", checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(WeightsUnavailable, match=r"does not exist.*state dict"):
        load_model(spec)


def test_bad_checkpoint_suffix_and_empty_file(tmp_path):
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(InvalidInput, match="suffix"):
        load_model(resolve_model_spec("ViT-B-32", checkpoint=str(tmp_path / "w.txt")))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(InvalidInput, match="empty"):
        load_model(resolve_model_spec("ViT-B-32", checkpoint=str(tmp_path / "empty.pt")))


def test_checkpoint_of_another_architecture_is_a_clear_error(tiny_spec):
    spec = resolve_model_spec("RN50", checkpoint=tiny_spec.checkpoint)
    with pytest.raises(InvalidInput, match="could not load model"):
        load_model(spec)


def test_pretrained_tag_not_cached_is_refused_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    spec = resolve_model_spec("ViT-B-32", pretrained="laion2b_s34b_b79k")
    with pytest.raises(WeightsUnavailable, match=r"does not download.*--checkpoint"):
        load_model(spec, cache_dir=str(tmp_path))


def test_unknown_pretrained_tag():
    with pytest.raises(InvalidInput, match="known tags"):
        load_model(resolve_model_spec("ViT-B-32", pretrained="nope"))


def test_pretrained_tag_loads_from_local_cache(tmp_path, vit_b32_checkpoint):
    """The real tag path: open_clip's cache layout for a url tag, filled by hand as an operator would."""
    import shutil

    from open_clip.pretrained import get_pretrained_cfg

    url = get_pretrained_cfg("ViT-B-32", "openai")["url"]
    shutil.copy(vit_b32_checkpoint, tmp_path / url.rsplit("/", 1)[1])
    loaded = load_model(resolve_model_spec("ViT-B-32", pretrained="openai"), cache_dir=str(tmp_path))
    assert loaded.spec.weights == "pretrained:openai"
    state = torch.load(vit_b32_checkpoint, weights_only=True)
    assert torch.equal(loaded.model.visual.proj, state["visual.proj"])


def test_spec_needs_exactly_one_weight_source():
    with pytest.raises(InvalidInput, match="exactly one weight source"):
        ModelSpec(name="x", architecture="ViT-B-32")
    with pytest.raises(InvalidInput, match="exactly one weight source"):
        ModelSpec(name="x", architecture="ViT-B-32", pretrained="openai", checkpoint="/w.pt")


def test_registry_by_name(tiny_spec):
    register_model(tiny_spec)
    try:
        assert get_model_spec(tiny_spec.name) is tiny_spec
        with pytest.raises(InvalidInput, match="already registered"):
            register_model(ModelSpec(name=tiny_spec.name, architecture="RN50", random_init=True))
    finally:
        MODEL_REGISTRY.pop(tiny_spec.name)


def test_device_and_precision_choice():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    with pytest.raises(InvalidInput, match="needs a GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(InvalidInput, match="unknown precision"):
        resolve_precision("fp8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInput, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.gpu
def test_gpu_half_precision_close_to_fp32(tiny_spec):
    fp32 = ClipEncoder(load_model(tiny_spec, device="cpu"))
    fp16 = ClipEncoder(load_model(tiny_spec, device="cuda", precision="fp16"))
    assert fp16.loaded.dtype == torch.float16
    pixels = torch.randn(4, 3, 32, 32)
    a = torch.nn.functional.normalize(fp32.encode_images(pixels).native, dim=-1)
    b = torch.nn.functional.normalize(fp16.encode_images(pixels).native.cpu(), dim=-1)
    assert np.all((a * b).sum(-1).numpy() > 0.999)


def test_the_weights_hashed_are_the_weights_loaded(tiny_spec, tmp_path, monkeypatch):
    """Issue 22 item 7: the file was hashed apart from the load, so one replaced in between was loaded under the
    other's fingerprint. Here the checkpoint is replaced on disk right after the loader's first open of it."""
    import builtins
    import hashlib
    import io
    import os
    import shutil
    from pathlib import Path

    path = tmp_path / "weights.pt"
    shutil.copy(tiny_spec.checkpoint, path)
    original = torch.load(path, weights_only=True)
    replacement = tmp_path / "replacement.pt"
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in original.items()}, replacement)
    states = {hashlib.sha256(p.read_bytes()).hexdigest(): torch.load(p, weights_only=True) for p in (path, replacement)}

    real_open, opens = builtins.open, []

    def open_then_replace(file, *args, **kwargs):
        handle = real_open(file, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and Path(file) == path:
            opens.append(file)
            if len(opens) == 1:  # whoever opens the path next reads the other file
                os.replace(replacement, path)
        return handle

    monkeypatch.setattr(builtins, "open", open_then_replace)
    monkeypatch.setattr(io, "open", open_then_replace)
    loaded = load_model(
        ModelSpec(
            name="swapped", architecture=tiny_spec.architecture, checkpoint=str(path), config_file=tiny_spec.config_file
        )
    )
    monkeypatch.undo()
    assert opens, "the loader never opened the checkpoint through open(): the swap did not happen"
    hashed = states[loaded.weights_sha256]
    state = loaded.model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in hashed.items())


def test_wrapped_checkpoints_load_as_open_clip_loads_them(tiny_spec, tmp_path):
    """A training checkpoint ({'state_dict': ...}, DataParallel 'module.' keys) loads; a pickle of something
    else is a clear error. The loader parses the bytes itself now, so it keeps open_clip's unwrapping."""
    state = torch.load(tiny_spec.checkpoint, weights_only=True)
    wrapped = tmp_path / "trained.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    loaded = load_model(
        ModelSpec(
            name="wrapped",
            architecture=tiny_spec.architecture,
            checkpoint=str(wrapped),
            config_file=tiny_spec.config_file,
        )
    )
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
    not_weights = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_weights)
    with pytest.raises(InvalidInput, match="holds list, not a state dict"):
        load_model(
            ModelSpec(
                name="list",
                architecture=tiny_spec.architecture,
                checkpoint=str(not_weights),
                config_file=tiny_spec.config_file,
            )
        )


def test_random_weights_are_the_same_in_every_load_and_leave_the_callers_random_state(tiny_spec):
    """A random_init model was drawn from the process's random state: a server, an index job and each Ray worker
    built other weights under one name, and a collection filled by several mixed vectors of different models,
    with nothing to tell (random weights have no fingerprint). They are drawn from a fixed seed now, without
    touching the caller's random state."""
    spec = ModelSpec(
        name="tiny-random", architecture=tiny_spec.architecture, config_file=tiny_spec.config_file, random_init=True
    )
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = load_model(spec, device="cpu").model.state_dict()
    assert torch.equal(torch.rand(3), expected_next)
    torch.rand(5)  # another state: the weights must not depend on it
    second = load_model(spec, device="cpu").model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
