"""Loads an open_clip model from a spec, never downloading: weights come from disk or nowhere."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from embedsvc.errors import InvalidInput, UnsupportedModel, WeightsUnavailable, quoted
from embedsvc.models.device import resolve_device, resolve_precision, torch_dtype
from embedsvc.models.registry import ModelSpec

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass
class LoadedModel:
    """A model ready for inference, with what encoding needs alongside it."""

    # The spec it was loaded from.
    spec: ModelSpec
    # The open_clip model, in eval mode, on `device`.
    model: torch.nn.Module
    # The model's own validation transform: PIL image -> [3, H, W] tensor.
    preprocess: Callable[[Any], torch.Tensor]
    # The model's tokenizer: list[str] -> [B, context_length] token ids.
    tokenizer: Any
    # Where the model runs.
    device: torch.device
    # Compute dtype of the weights.
    dtype: torch.dtype
    # Joint embedding dimension.
    embed_dim: int
    # Input side in pixels.
    image_size: int
    # Text context length in tokens.
    context_length: int
    # "vit" or "resnet".
    vision_tower: str
    # Seconds the load took.
    load_seconds: float
    # sha256 (hex) of the weights file loaded; "" for random weights. Collections record it at creation, so
    # a name that later loads other weights cannot mix their vectors with the stored ones.
    weights_sha256: str = ""


def load_model(
    spec: ModelSpec, device: str = "auto", precision: str = "auto", cache_dir: str | None = None
) -> LoadedModel:
    """Builds the architecture, loads its weights strictly, and puts it in eval mode on the device."""
    import open_clip
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    started = time.perf_counter()
    torch_device = resolve_device(device)
    open_clip_precision = resolve_precision(precision, torch_device)
    if spec.config_file is not None:
        _register_architecture(spec)

    kwargs: dict[str, Any] = {}
    weights_path: str | None = None
    if spec.checkpoint is not None:
        weights_path = _checked_checkpoint(spec.checkpoint)
    elif spec.pretrained is not None:
        weights_path, tag_cfg = _cached_pretrained_file(spec.architecture, spec.pretrained, cache_dir)
        for ours, theirs in (
            ("image_mean", "mean"),
            ("image_std", "std"),
            ("image_interpolation", "interpolation"),
            ("image_resize_mode", "resize_mode"),
        ):
            if tag_cfg.get(theirs) is not None:
                kwargs[ours] = tag_cfg[theirs]
        if tag_cfg.get("quick_gelu"):
            kwargs["force_quick_gelu"] = True
    # The bytes hashed are the bytes loaded: the file is read once (hashing it apart from open_clip's own read
    # of the path let a file replaced in between load under the other file's fingerprint). They are parsed and
    # dropped before the model is built, so memory peaks at twice the file's size, as open_clip's own load did.
    data, weights_sha256 = _read_weights(weights_path) if weights_path is not None else (b"", "")

    try:
        state_dict = _state_dict_from_bytes(data, weights_path) if weights_path is not None else None
        del data
        with _quiet_random_init_warning(state_dict is not None), _fixed_initial_weights():
            # pretrained_text=False: no text tower fetches base weights of its own (weights come from disk or nowhere).
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.architecture, device=torch_device, precision=open_clip_precision, pretrained_text=False, **kwargs
            )
        if state_dict is not None:
            _load_state_dict(model, state_dict)
            del state_dict
    except Exception as exc:  # mismatches surface as RuntimeError, AssertionError, KeyError,
        # unpickling or safetensors errors depending on where they are found; all mean "wrong file".
        raise InvalidInput(
            f"could not load model {quoted(spec.name)} ({spec.architecture}, weights {spec.weights}): {exc}"
        ) from exc
    model.eval()

    visual = getattr(model, "visual", None)
    if isinstance(visual, VisionTransformer):
        vision_tower = "vit"
    elif isinstance(visual, ModifiedResNet):
        vision_tower = "resnet"
    else:
        raise UnsupportedModel(
            f"model {quoted(spec.name)}: vision tower {type(visual).__name__} exposes no token features embedsvc "
            f"can pool; use a native open_clip ViT or ModifiedResNet (RN50...) architecture"
        )
    image_size = visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    elapsed = time.perf_counter() - started
    loaded = LoadedModel(
        spec=spec,
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(spec.architecture),
        device=torch_device,
        dtype=torch_dtype(open_clip_precision),
        embed_dim=int(visual.output_dim),
        image_size=int(image_size),
        context_length=int(model.context_length),
        vision_tower=vision_tower,
        load_seconds=elapsed,
        weights_sha256=weights_sha256,
    )
    log.info(
        "loaded model %s (%s, %s) on %s as %s in %.1fs",
        spec.name,
        spec.architecture,
        spec.weights,
        torch_device,
        open_clip_precision,
        elapsed,
    )
    return loaded


def input_size(spec: ModelSpec) -> int:
    """What `load_model(spec).image_size` will be, from the architecture's config without building the model:
    jobs decode their images at the model's size before loading it. 0 when the config is unknown here."""
    import open_clip

    if spec.config_file is not None:
        _register_architecture(spec)
    return config_input_size(open_clip.get_model_config(spec.architecture))


def config_input_size(model_cfg: dict | None) -> int:
    """The image side of an open_clip model config (0 when it names none)."""
    size = ((model_cfg or {}).get("vision_cfg") or {}).get("image_size", 0)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def weights_sha256(spec: ModelSpec, cache_dir: str | None = None) -> str:
    """What `load_model(spec).weights_sha256` will be, without building the model (for checks before a job
    hands the model name to other processes)."""
    if spec.checkpoint is not None:
        return file_sha256(_checked_checkpoint(spec.checkpoint))
    if spec.pretrained is not None:
        return file_sha256(_cached_pretrained_file(spec.architecture, spec.pretrained, cache_dir)[0])
    return ""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (about a second per GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_weights(path: str) -> tuple[bytes, str]:
    """The whole weights file and its hex sha256, from one read (memory: the file's size, until it is parsed)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise WeightsUnavailable(f"weights file {path} cannot be read: {exc.strerror or exc}") from None
    return data, hashlib.sha256(data).hexdigest()


def _state_dict_from_bytes(data: bytes, path: str) -> dict[str, torch.Tensor]:
    """Parses a state dict as open_clip's load_state_dict parses a file (format by suffix, 'state_dict'
    unwrapped, DataParallel's 'module.' prefix removed), from bytes already read and hashed."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        checkpoint: Any = load_safetensors(data)  # whatever the file holds, checked below
    else:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ValueError(f"{path} holds {type(checkpoint).__name__ if checkpoint else 'nothing'}, not a state dict")
    if next(iter(checkpoint)).startswith("module"):
        checkpoint = {key[7:]: value for key, value in checkpoint.items()}
    return checkpoint


def _load_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Loads strictly, with the key fixes of open_clip's factory.load_checkpoint (3.x), which takes a path only:
    third-party layouts, the old text layout, scalar vs 1-d logit scale and bias, stale position ids, and
    positional embeddings resized to the model's grid and context."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    state_dict = convert_state_dict(model, state_dict)
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    for key in ("logit_scale", "logit_bias"):
        param = getattr(model, key, None)
        if key in state_dict and param is not None and param.ndim != state_dict[key].ndim:
            state_dict[key] = state_dict[key].reshape(param.shape)
    if "logit_bias" not in state_dict and getattr(model, "logit_bias", None) is not None:
        state_dict["logit_bias"] = torch.zeros_like(state_dict["logit_scale"])
    position_id_key = "text.transformer.embeddings.position_ids"
    if position_id_key in state_dict and not hasattr(model, position_id_key):
        del state_dict[position_id_key]
    resize_pos_embed(state_dict, model)
    resize_text_pos_embed(state_dict, model)
    model.load_state_dict(state_dict, strict=True)


class _RandomInitWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


# The seed of every model build: random_init weights are the same in every process that builds them.
RANDOM_INIT_SEED = 0


@contextlib.contextmanager
def _fixed_initial_weights():
    """A model is built from a fixed seed, so random_init weights are the same in a server, an index job and each
    Ray worker (they have no fingerprint: a collection filled by several would mix models unseen). The caller's
    random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        yield


@contextlib.contextmanager
def _quiet_random_init_warning(active: bool):
    """open_clip warns that a model created without a weights path is "initialized randomly"; a false alarm
    when its weights are loaded right after, so it is dropped then (open_clip logs it on the root logger)."""
    if not active:
        yield
        return
    root, dropped = logging.getLogger(), _RandomInitWarningFilter()
    root.addFilter(dropped)
    try:
        yield
    finally:
        root.removeFilter(dropped)


def _register_architecture(spec: ModelSpec) -> None:
    import open_clip

    assert spec.config_file is not None  # called for specs with a config file only
    path = Path(spec.config_file)
    if not path.is_file():
        raise WeightsUnavailable(f"model {quoted(spec.name)}: config file {path} does not exist")
    if path.stem != spec.architecture:
        raise InvalidInput(
            f"model {quoted(spec.name)}: config file must be named {spec.architecture}.json, got {path.name}"
        )
    open_clip.add_model_config(str(path))


def _checked_checkpoint(checkpoint: str) -> str:
    path = Path(checkpoint)
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise InvalidInput(
            f"checkpoint {path} has suffix {quoted(path.suffix)}; expected one of {', '.join(CHECKPOINT_SUFFIXES)} "
            f"(an open_clip state dict)"
        )
    if not path.is_file():
        raise WeightsUnavailable(
            f"checkpoint file {path} does not exist: give the path of an open_clip state dict "
            f"(.pt/.bin/.safetensors) saved with torch.save(model.state_dict()) or safetensors"
        )
    if path.stat().st_size == 0:
        raise InvalidInput(f"checkpoint file {path} is empty")
    return str(path)


def _cached_pretrained_file(architecture: str, tag: str, cache_dir: str | None) -> tuple[str, dict]:
    """Finds a pretrained tag's weights in the local caches; never downloads."""
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    cfg = get_pretrained_cfg(architecture, tag)
    if not cfg:
        tags = ", ".join(list_pretrained_tags_by_model(architecture)) or "none"
        raise InvalidInput(f"{architecture} has no pretrained tag {quoted(tag)}; known tags: {tags}")
    if cfg.get("file") and os.path.isfile(cfg["file"]):
        return cfg["file"], cfg
    candidates: list[str] = []
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            found = _hf_cached(repo_id, name, cache_dir)
            if found:
                return found, cfg
            candidates.append(f"Hugging Face repo {repo_id}, file {name}")
    url = cfg.get("url", "")
    if url:
        target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(target):
            return target, cfg
        candidates.append(f"{url} saved as {target}")
    raise WeightsUnavailable(
        f"weights for {architecture} pretrained={quoted(tag)} are not on this machine, and embedsvc does not download "
        f"at run time. Fetch them where there is network ({'; or '.join(candidates)}) and copy them here, "
        f"or pass a local checkpoint file instead (--checkpoint PATH, or a model spec with checkpoint=...)"
    )


def _hf_cached(repo_id: str, filename: str, cache_dir: str | None) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    return found if isinstance(found, str) else None
