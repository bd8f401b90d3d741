"""Contrastive training (open_clip's CLIP loss, plus optional hard negatives; AdamW, warmup + cosine schedule)
of any open_clip config.

Writes `<name>.safetensors` (an open_clip state dict), `<name>.json` (the model config, so that the
architecture can be registered where the checkpoint is loaded) and a model card (data, steps, time,
held-out recall).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from embedsvc.encoder.encoder import text_forward, text_tower
from embedsvc.encoder.token_modes import FINAL, vit_forward
from embedsvc.errors import InvalidInput
from embedsvc.eval import TASKS, cross_modal_metrics, not_measured
from embedsvc.pooling.functional import masked_max, masked_mean, signed_gem
from embedsvc.progress import Progress
from embedsvc.training.data import PairData, manifest_pairs, read_manifest_images, scene_pairs

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """What `embedsvc train` trains, on what, for how long."""

    # open_clip model config JSON (registered under its file stem); or None to use `architecture`.
    config_file: str | None = None
    # Built-in open_clip architecture, used when config_file is None.
    architecture: str = "ViT-B-32"
    # Registered model to start from (its architecture and weights; the CLI's `--init` option group
    # registers it); None trains from random initialisation.
    init: str | None = None
    # Name of the trained model (output file stems). Default: the architecture name.
    name: str | None = None
    # Image pooling the model is trained with: "cls" (CLS token, classic CLIP) or "avg" (mean of patches).
    image_pool: str = "cls"
    # "scenes" (the built-in generator) or the path of a CSV/JSONL manifest of image paths and captions.
    data: str = "scenes"
    # Scenes to render for training (data=scenes).
    train_size: int = 20_000
    # Share of training scenes drawn by the augmented renderer (free placement and size, rotations, other
    # backgrounds, outlines, aliasing, colour jitter; embedsvc.datasets.augment); 0: the plain renderer only.
    augment: float = 0.0
    # Patch-token poolings ("avg,max", also "gem") whose contrastive loss against the text is added to the
    # native embedding's, so that pooled patch tokens align with text too (ViT towers); "": native only.
    token_losses: str = ""
    # Weight of each patch-token loss against the native embedding's (1: equal).
    token_loss_weight: float = 1.0
    # 1: each scene caption brings a hard negative, the same caption with one object's shape (else colour)
    # swapped, among the texts every image is contrasted with (NegCLIP-style), so that colour and place alone
    # no longer tell captions apart; scenes data only. 0: in-batch negatives only.
    hard_negatives: int = 0
    # Held-out pairs for the recall in the model card: the scenes test split, or a slice of the manifest.
    eval_size: int = 1000
    # A separate manifest to evaluate on (its first eval_size usable rows); training then uses all of `data`.
    eval_data: str | None = None
    # Optimiser steps.
    steps: int = 2000
    # Pairs per step (the contrastive batch).
    batch_size: int = 256
    # Peak learning rate.
    lr: float = 1e-3
    # Linear warm-up steps before the cosine decay.
    warmup_steps: int = 100
    # AdamW weight decay (not applied to gains, biases, embeddings' scale).
    weight_decay: float = 0.1
    # Probability that a pair uses the image's full caption rather than another of its captions.
    primary_share: float = 0.6
    # Seed for initialisation and batch sampling.
    seed: int = 0
    # "auto", "cpu" or "cuda[:N]".
    device: str = "auto"
    # CPU threads for torch (0: all cores).
    threads: int = 0
    # Evaluate held-out recall every this many steps (0: only at the end).
    eval_every: int = 0
    # Store weights as "fp32" or "fp16" (halves the file; loads into fp32 models unchanged otherwise).
    save_dtype: str = "fp32"
    # Output folder.
    out_dir: str = "trained"


@dataclass
class TrainResult:
    checkpoint: Path
    config_file: Path
    card: Path
    metrics: dict
    seconds: float
    skipped: list = field(default_factory=list)


def _input_size(config: TrainConfig) -> int:
    """The input side of the model `_build` makes, from its config alone (0 when not found: `_build` says why)."""
    import open_clip

    from embedsvc.models import get_model_spec, input_size
    from embedsvc.models.loader import config_input_size

    if config.init:
        return input_size(get_model_spec(config.init))
    if config.config_file:
        path = Path(config.config_file)
        return config_input_size(json.loads(path.read_text())) if path.is_file() else 0
    return config_input_size(open_clip.get_model_config(config.architecture))


def _build(config: TrainConfig, device: torch.device):
    import open_clip

    if config.init:
        return _build_from(config, device)
    if config.config_file:
        path = Path(config.config_file)
        if not path.is_file():
            raise InvalidInput(f"model config {path} does not exist")
        model_cfg = json.loads(path.read_text())
        arch = path.stem
    else:
        model_cfg = open_clip.get_model_config(config.architecture)
        if model_cfg is None:
            raise InvalidInput(f"unknown open_clip architecture {config.architecture!r}")
        arch = config.architecture
    if config.image_pool not in ("cls", "avg"):
        raise InvalidInput(f"--image-pool must be cls or avg, got {config.image_pool!r}")
    model_cfg = json.loads(json.dumps(model_cfg))
    model_cfg.setdefault("vision_cfg", {})["pool_type"] = "tok" if config.image_pool == "cls" else "avg"
    name = config.name or arch
    config_file = _register_output_config(config, name, model_cfg)
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    return name, model, preprocess, open_clip.get_tokenizer(name), config_file


def _register_output_config(config: TrainConfig, name: str, model_cfg: dict) -> Path:
    """Writes the model config beside the checkpoint to come (where loading finds it), registers it with
    open_clip under `name`, and seeds initialisation."""
    import open_clip

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / f"{name}.json"
    config_file.write_text(json.dumps(model_cfg, indent=2) + "\n")
    open_clip.add_model_config(str(config_file))
    torch.manual_seed(config.seed)
    return config_file


def _init_source(config: TrainConfig) -> str:
    if not config.init:
        return "random weights"
    from embedsvc.models import get_model_spec

    weights = get_model_spec(config.init).weights
    kind, _, where = weights.partition(":")
    if kind == "checkpoint" and Path(where).is_absolute() and Path(where).is_relative_to(Path.cwd()):
        weights = f"checkpoint:{Path(where).relative_to(Path.cwd())}"  # the card names no machine's folders
    return f"{config.init} ({weights})"


def _build_from(config: TrainConfig, device: torch.device):
    """Starts from a registered model: its architecture config (written out beside the result) and weights."""
    import open_clip

    from embedsvc.models import get_model_spec, load_model

    if config.config_file:
        raise InvalidInput("--config and --init both name an architecture: give one (--init brings its own)")
    assert config.init is not None  # _build comes here for --init
    spec = get_model_spec(config.init)
    loaded = load_model(spec, device=str(device), precision="fp32")
    model_cfg = (
        json.loads(Path(spec.config_file).read_text())
        if spec.config_file
        else open_clip.get_model_config(spec.architecture)
    )
    name = config.name or spec.architecture
    config_file = _register_output_config(config, name, model_cfg)
    for p in loaded.model.parameters():
        p.requires_grad_(True)
    return name, loaded.model, loaded.preprocess, loaded.tokenizer, config_file


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (
            no_decay if p.ndim < 2 or "bias" in n or "ln" in n or "logit_scale" in n or "embedding" in n else decay
        ).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * config.lr * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model, data: PairData, device: torch.device, batch: int = 256) -> dict:
    """Held-out retrieval with each image's primary (full) caption, by embedsvc.eval's definitions:
    identical captions are one text; with labels, every image of a caption's class is relevant."""
    model.eval()
    images, texts = [], []
    for start in range(0, len(data), batch):
        images.append(F.normalize(model.encode_image(data.pixels[start : start + batch].to(device)), dim=-1).cpu())
        ids = torch.stack([c[0] for c in data.captions[start : start + batch]]).to(device)
        texts.append(F.normalize(model.encode_text(ids), dim=-1).cpu())
    captions = [c[0].numpy().tobytes() for c in data.captions]  # identical token ids: identical texts
    metrics = cross_modal_metrics(
        torch.cat(images).numpy(), torch.cat(texts).numpy(), captions=captions, labels=data.labels, image_keys=data.keys
    )
    return {k: v.as_dict() for k, v in metrics.items()}


def _check_options(config: TrainConfig) -> None:
    """Refuses bad options before any model is built or data prepared: a typo costs nothing."""
    if config.hard_negatives and config.data != "scenes":
        raise InvalidInput("--hard-negatives needs --data scenes (a manifest's captions cannot be swapped)")
    for manifest in (config.data if config.data != "scenes" else None, config.eval_data):
        if manifest and not Path(manifest).is_file():
            raise InvalidInput(f"manifest {manifest} does not exist")
    if config.hard_negatives not in (0, 1):
        raise InvalidInput(f"--hard-negatives is 0 (off) or 1 (one per caption), got {config.hard_negatives}")
    if not (math.isfinite(config.token_loss_weight) and config.token_loss_weight >= 0):
        raise InvalidInput(f"--token-loss-weight must be a finite number >= 0, got {config.token_loss_weight}")
    if not 0 <= config.augment <= 1:
        raise InvalidInput(f"--augment is a share of the training scenes, in [0, 1]; got {config.augment}")


def train(config: TrainConfig) -> TrainResult:
    from embedsvc.models.device import resolve_device

    _check_options(config)
    started = time.perf_counter()
    # Manifests are read and decoded (at the model's input size) before the model is built: one with nothing
    # usable fails at once.
    side = _input_size(config) if config.data != "scenes" else 0
    train_rows = read_manifest_images(config.data, side) if config.data != "scenes" else None
    eval_rows = read_manifest_images(config.eval_data, side) if train_rows and config.eval_data else None
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    device = resolve_device(config.device)
    name, model, preprocess, tokenizer, config_file = _build(config, device)
    token_pools = _token_pools(config.token_losses, model)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size

    log.info("preparing data (%s)", config.data)
    if config.data == "scenes":
        train_data = scene_pairs(
            "train",
            config.train_size,
            preprocess,
            tokenizer,
            image_size,
            augment=config.augment,
            negatives=bool(config.hard_negatives),
        )
        eval_data = scene_pairs("test", config.eval_size, preprocess, tokenizer, image_size)
        data_desc = (
            f"generated scenes: {config.train_size} training scenes (split 'train', seeds 0.."
            f"{config.train_size - 1}, {config.augment:.0%} drawn by the augmented renderer); held-out: "
            f"{config.eval_size} scenes of split 'test'"
        )
    elif config.eval_data:
        assert train_rows is not None and eval_rows is not None  # read above (nothing usable: refused there)
        train_data = manifest_pairs(train_rows, preprocess, tokenizer, image_size)
        eval_data = manifest_pairs(eval_rows, preprocess, tokenizer, image_size)
        n_eval = min(config.eval_size, len(eval_data))
        eval_data = PairData(
            eval_data.pixels[:n_eval],
            eval_data.captions[:n_eval],
            eval_data.ids[:n_eval],
            None,
            eval_data.skipped,
            eval_data.labels[:n_eval] if eval_data.labels else None,
        )
        train_data.skipped = train_data.skipped + eval_data.skipped
        data_desc = (
            f"manifest {config.data}: {len(train_data)} training pairs; held out: the first {n_eval} "
            f"usable rows of {config.eval_data}; {len(train_data.skipped)} rows skipped"
        )
    else:
        assert train_rows is not None  # read above
        all_data = manifest_pairs(train_rows, preprocess, tokenizer, image_size)
        n_eval = min(config.eval_size, len(all_data) // 5)
        order = np.random.default_rng(config.seed).permutation(len(all_data))
        eval_index, train_index = order[:n_eval].tolist(), order[n_eval:].tolist()

        def subset(index):
            return PairData(
                all_data.pixels[index],
                [all_data.captions[i] for i in index],
                [all_data.ids[i] for i in index],
                None,
                labels=[all_data.labels[i] for i in index] if all_data.labels else None,
            )

        train_data, eval_data = subset(train_index), subset(eval_index)
        train_data.skipped = all_data.skipped
        data_desc = (
            f"manifest {config.data}: {len(train_index)} training pairs, {n_eval} held out, "
            f"{len(all_data.skipped)} rows skipped"
        )
    prep_seconds = time.perf_counter() - started

    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng(config.seed)
    progress = Progress(config.steps, unit="pairs", label="step ")
    history = []
    pairs = 0
    model.train()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        batch = train_data.sample_batch(rng, config.batch_size, config.primary_share).to(device)
        loss = _loss(
            model,
            batch.images,
            batch.texts,
            token_pools,
            batch.negatives,
            config.token_loss_weight,
            batch.negative_mask,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        pairs += len(batch.images)
        progress.update(step + 1, pairs, f"loss {loss.item():.4f} ")
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            metrics = evaluate(model, eval_data, device)
            history.append({"step": step + 1, "loss": loss.item(), "t2i_r1": metrics["text_to_image"]["recall_at_1"]})
            log.info("step %d held-out t2i R@1 %.3f", step + 1, history[-1]["t2i_r1"])
            model.train()
    train_seconds = time.perf_counter() - started - prep_seconds

    metrics = evaluate(model, eval_data, device)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if config.save_dtype == "fp16":
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    from safetensors.torch import save_file

    out = Path(config.out_dir)
    checkpoint = out / f"{name}.safetensors"
    save_file(state, str(checkpoint), metadata={"format": "open_clip state dict", "architecture": name})
    seconds = time.perf_counter() - started
    unmeasured = not_measured(metrics, labels=eval_data.labels is not None, image_keys=eval_data.keys is not None)
    card = _write_card(
        out, name, config, data_desc, metrics, history, prep_seconds, train_seconds, device, checkpoint, unmeasured
    )
    return TrainResult(checkpoint, config_file, card, metrics, seconds, train_data.skipped)


_TOKEN_POOLS = {"avg": masked_mean, "max": masked_max, "gem": lambda t, m: signed_gem(t, m, 3.0)}


def _token_pools(spec: str, model) -> dict:
    """The pooling functions named by --token-losses, checked before any data is prepared."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in _TOKEN_POOLS]
    if unknown:
        raise InvalidInput(
            f"--token-losses: unknown pooling(s) {', '.join(unknown)}; choose from {', '.join(_TOKEN_POOLS)}"
        )
    if names and not hasattr(model.visual, "transformer"):
        raise InvalidInput("--token-losses needs a ViT image tower (patch tokens)")
    return {n: _TOKEN_POOLS[n] for n in names}


def contrastive_loss(
    images: torch.Tensor,
    texts: torch.Tensor,
    scale: torch.Tensor,
    negatives: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (open_clip's ClipLoss on one process) of L2-normalised rows, image i matching text i;
    `negatives` ([M, D]) are extra texts in every image's softmax, except where `negative_mask` ([B, M]) is
    True: a negative that is true of that image."""
    logits = scale * images @ texts.T
    target = torch.arange(len(images), device=images.device)
    image_logits = logits
    if negatives is not None:
        extra = scale * images @ negatives.T
        if negative_mask is not None:
            extra = extra.masked_fill(negative_mask, float("-inf"))
        image_logits = torch.cat([logits, extra], dim=1)
    return (F.cross_entropy(image_logits, target) + F.cross_entropy(logits.T, target)) / 2


def _loss(
    model,
    images: torch.Tensor,
    texts: torch.Tensor,
    token_pools: dict,
    negatives: torch.Tensor | None = None,
    token_weight: float = 1.0,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The contrastive loss of the native embeddings plus, per pooling in `token_pools` and weighted by
    `token_weight`, that of the pooled projected image patch tokens against the same pooling of the texts'
    tokens (SOT..EOT): exactly the vectors that pooling gives each modality at serving time. `negatives`:
    hard negative texts (token ids) in every image's softmax, for each loss, but where `negative_mask` says a
    negative is true of that image. One forward pass per tower."""
    logit_scale = model.logit_scale.exp()
    all_texts = texts if negatives is None else torch.cat([texts, negatives])
    split = len(texts)

    def pair(image_vectors, text_vectors):
        text_vectors = F.normalize(text_vectors, dim=-1)
        return contrastive_loss(
            F.normalize(image_vectors, dim=-1),
            text_vectors[:split],
            logit_scale,
            None if negatives is None else text_vectors[split:],
            negative_mask,
        )

    if not token_pools:
        return pair(model.encode_image(images), model.encode_text(all_texts))
    image_native, image_tokens = vit_forward(model.visual, images)
    image_tokens = image_tokens[FINAL]
    image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=image_tokens.device)
    text_native, text_tokens, text_mask = text_forward(text_tower(model, "trained model"), all_texts)
    loss = pair(image_native, text_native)
    for pool in token_pools.values():
        loss = loss + token_weight * pair(pool(image_tokens, image_mask), pool(text_tokens, text_mask))
    return loss


def _objective(config: TrainConfig) -> str:
    """The model card's line on what the loss included beyond the native contrastive one."""
    weight = f" (weight {config.token_loss_weight:g})" if config.token_losses and config.token_loss_weight != 1 else ""
    negatives = (
        "one per caption (a shape or colour swapped; lone objects also captioned by colour and shape alone)"
        if config.hard_negatives
        else "none"
    )
    return f"patch-token losses: {config.token_losses or 'none'}{weight}; hard negatives: {negatives}"


def _card_row(task: str, m: dict | None, reason: str) -> str:
    """One task's row of the card's table; a task that was not measured says so and why, never 0.000."""
    if m is None:
        return f"| {task} | not measured: {reason} | | | | | | |"
    return (
        f"| {task} | {m['recall_at_1']:.3f} ({m['chance_recall_at_1']:.3f}) | {m['recall_at_5']:.3f} "
        f"({m['chance_recall_at_5']:.3f}) | {m['recall_at_10']:.3f} ({m['chance_recall_at_10']:.3f}) | "
        f"{m['median_rank']:.0f} ({m['chance_median_rank']:.0f}) | {m['mean_average_precision']:.3f} "
        f"({m['chance_mean_average_precision']:.3f}) | {m['queries']} | {m['relevant_per_query']:.1f} |"
    )


def _write_card(
    out: Path,
    name: str,
    config: TrainConfig,
    data_desc: str,
    metrics: dict,
    history: list,
    prep_seconds: float,
    train_seconds: float,
    device,
    checkpoint: Path,
    unmeasured: dict[str, str] | None = None,
) -> Path:
    """model_card.json and model_card.md; `unmeasured`: why each task absent from `metrics` was not measured."""
    unmeasured = unmeasured or {}
    info = {
        "name": name,
        "config": asdict(config),
        "data": data_desc,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "data_seconds": round(prep_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "checkpoint_bytes": checkpoint.stat().st_size,
        "held_out": metrics,
        **({"not_measured": unmeasured} if unmeasured else {}),
        "history": history,
    }
    (out / "model_card.json").write_text(json.dumps(info, indent=2) + "\n")
    rows = "\n".join(
        _card_row(task, metrics.get(task), unmeasured.get(task, "no query to measure"))
        for task in TASKS
        if task in metrics or task in unmeasured
    )
    card = out / "model_card.md"
    steps = (
        f"{config.steps} x batch {config.batch_size}, peak lr {config.lr}, weight decay {config.weight_decay}, "
        f"seed {config.seed}"
    )
    machine = (
        f"{device}, {torch.get_num_threads()} threads; data preparation {prep_seconds:.0f} s, training "
        f"{train_seconds / 60:.1f} min"
    )
    card.write_text(f"""# {name}

Trained with `embedsvc train` (the CLIP contrastive loss, AdamW, warm-up + cosine schedule).

- Data: {data_desc}
- Image pooling trained: {config.image_pool}; {_objective(config)}
- Initialised from: {_init_source(config)}
- Steps: {steps}
- Device: {machine}
- Checkpoint: {checkpoint.name} ({checkpoint.stat().st_size / 1e6:.1f} MB, {config.save_dtype})

## Held-out retrieval (native `cls` embedding; chance level of a random ranking in brackets)

Relevance: identical captions are one text; with a `label`/`class` column, every image of a caption's class
is relevant to it (and images of one class to each other); scenes: image->image by the same objects.

| task | R@1 | R@5 | R@10 | median rank | mAP | queries | relevant per query |
|---|---|---|---|---|---|---|---|
{rows}
""")
    return card
