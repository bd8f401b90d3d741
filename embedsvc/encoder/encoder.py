"""One forward pass per tower, returning token features in the joint space and the native embedding.

Per pooling.md: ViT tokens are `ln_post(h)[:, 1:] @ proj` (CLS excluded); ModifiedResNet tokens are
the final feature map passed per location through the attention pool's value and output projections
(MaskCLIP); text tokens are `ln_final(x) @ text_projection` with SOT..EOT masked in. The native output
is computed by the same operations open_clip's encode_image / encode_text run, so it equals them.
ViT patch tokens can also be asked for in other token modes (embedsvc.encoder.token_modes), which share
the trunk pass and change only the last block's computation; the native output never changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image

from embedsvc.encoder.preprocess import split_transform
from embedsvc.encoder.token_modes import vit_forward, vit_token_modes
from embedsvc.errors import EmptyText, UnsupportedModel, UnsupportedTokenMode, quoted
from embedsvc.models.loader import LoadedModel
from embedsvc.pooling.features import FINAL, IMAGE, TEXT, TokenFeatures

if TYPE_CHECKING:
    from open_clip.tokenizer import SimpleTokenizer


class ClipEncoder:
    """Wraps a loaded open_clip model; stateless apart from it, so one instance serves all threads."""

    def __init__(self, loaded: LoadedModel, max_batch: int = 64):
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.max_batch = max_batch
        self._text = text_tower(self.model, loaded.spec.name)
        self._split = split_transform(loaded.preprocess)
        self.image_token_modes: tuple[str, ...] = (FINAL,)
        if loaded.vision_tower == "vit":
            _check_vit(self.model.visual, loaded.spec.name)
            self.image_token_modes = vit_token_modes(self.model.visual)

    def check_token_modes(self, modes, modality: str = IMAGE) -> None:
        """Refuses, before any compute, token modes this model's tower for `modality` does not have."""
        valid = self.image_token_modes if modality == IMAGE else (FINAL,)
        bad = [m for m in modes if m not in valid]
        if bad:
            tower = f"{self.loaded.vision_tower} image tower" if modality == IMAGE else "text tower"
            raise UnsupportedTokenMode(
                f"model {quoted(self.loaded.spec.name)}: the {tower} has no token mode "
                f"{', '.join(bad)}; valid: {', '.join(valid)}"
            )

    # -- images ---------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The model's own transform (resize to its input size, crop, normalise), stacked on CPU."""
        return torch.stack([self.loaded.preprocess(image) for image in images])

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """One image ready to stack into an `encode_images` batch: the transform's geometry only, as uint8
        [3, H, W] (normalised with its batch, embedsvc.encoder.preprocess), or the whole transform's float
        tensor where it cannot be cut. Cheap to call from decode workers."""
        return self._split.to_uint8(image) if self._split else self.loaded.preprocess(image)

    @torch.inference_mode()
    def encode_images(
        self, images: Sequence[Image.Image] | torch.Tensor, modes: Sequence[str] = (FINAL,)
    ) -> TokenFeatures:
        """Encodes decoded RGB images, or a [B, 3, H, W] batch: float, as the model's transform gives, or
        uint8 as `prepare` gives. The result's tokens are those of modes[0]; the other modes' tokens ride
        along (TokenFeatures.in_mode), from the same pass."""
        modes = tuple(dict.fromkeys(modes)) or (FINAL,)
        self.check_token_modes(modes)
        pixels = images if isinstance(images, torch.Tensor) else torch.stack([self.prepare(image) for image in images])
        return TokenFeatures.concat(
            [self._encode_pixels(chunk, modes) for chunk in torch.split(pixels, self.max_batch)]
        )

    def _encode_pixels(self, pixels: torch.Tensor, modes: tuple[str, ...]) -> TokenFeatures:
        if pixels.dtype == torch.uint8:
            if self._split is None:
                raise TypeError("uint8 pixels need a transform that ends ToTensor, Normalize; pass floats")
            pixels = self._split.normalize(pixels, self.device, self.dtype)
        else:
            pixels = pixels.to(self.device, dtype=self.dtype, non_blocking=True)
        visual: Any = self.model.visual  # an open_clip tower (untyped): its layers are read by name
        if self.loaded.vision_tower == "vit":
            native, by_mode = vit_forward(visual, pixels, modes)
            mask = torch.ones(native.shape[0], by_mode[modes[0]].shape[1], dtype=torch.bool, device=native.device)
            return TokenFeatures(
                IMAGE,
                by_mode[modes[0]].float(),
                mask,
                native.float(),
                tuple(visual.grid_size),
                mode=modes[0],
                other_modes={m: by_mode[m].float() for m in modes[1:]},
            )
        x = visual.stem(pixels)
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
        native = visual.attnpool(x)
        grid = (x.shape[2], x.shape[3])
        dense = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
        pool = visual.attnpool
        tokens = F.linear(F.linear(dense, pool.v_proj.weight, pool.v_proj.bias), pool.c_proj.weight, pool.c_proj.bias)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return TokenFeatures(IMAGE, tokens.float(), mask, native.float(), grid)

    # -- text -----------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
        """Token ids [B, context] and, per text, whether it was cut to the context length."""
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise EmptyText(f"text input {i} is empty: send at least one non-blank character")
        from open_clip.tokenizer import SimpleTokenizer  # deferred: open_clip imports torchvision (~2 s)

        tokenizer = self.loaded.tokenizer
        if isinstance(tokenizer, SimpleTokenizer) and tokenizer.reduction_fn is None:
            return _simple_tokenize(tokenizer, texts)
        ids = tokenizer(list(texts))
        context = ids.shape[1]
        if hasattr(tokenizer, "encode"):
            truncated = [len(tokenizer.encode(text)) + 2 > context for text in texts]
        else:
            truncated = [bool(row[-1] != 0) for row in ids]
        return ids, truncated

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> TokenFeatures:
        ids, truncated = self.tokenize(texts)
        ids = trim_to_span(self._text, ids)
        features = TokenFeatures.concat([self._encode_ids(chunk) for chunk in torch.split(ids, self.max_batch)])
        features.truncated = truncated
        return features

    def _encode_ids(self, ids: torch.Tensor) -> TokenFeatures:
        native, tokens, mask = text_forward(self._text, ids.to(self.device))
        return TokenFeatures(TEXT, tokens.float(), mask, native.float())


def _simple_tokenize(tokenizer: SimpleTokenizer, texts: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
    """SimpleTokenizer's ids (SOT, BPE, EOT; cut to the context with EOT last), each text encoded once:
    the truncation flag comes from the same encoding instead of a second one."""
    context = tokenizer.context_length
    ids = torch.zeros(len(texts), context, dtype=torch.long)
    truncated = []
    for row, text in enumerate(texts):
        tokens = [tokenizer.sot_token_id, *tokenizer.encode(text), tokenizer.eot_token_id]
        truncated.append(len(tokens) > context)
        if len(tokens) > context:
            tokens = tokens[:context]
            tokens[-1] = tokenizer.eot_token_id
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids, truncated


def trim_to_span(t: dict, ids: torch.Tensor) -> torch.Tensor:
    """The ids cut to the longest text's SOT..EOT span where that cannot change any output: under a causal
    mask no position sees a later one, and argmax/eos pooling reads a position within the span. Short
    texts then cost a fraction of the context (a 10-token query is 1/7 of CLIP's 77 positions); the
    positions cut were padding that every pooling masks out."""
    if t["attn_mask"] is None or t["pool_type"] not in ("argmax", "eos"):
        return ids
    length = max(1, int(_text_mask(ids, t["pool_type"], t["eos_id"], t["pad_id"]).sum(dim=1).max()))
    return ids[:, :length]


def text_forward(t: dict, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(native [B, D], projected tokens [B, L, D], mask [B, L] of SOT..EOT) of a text tower (`text_tower`)
    over ids of the full context or cut by `trim_to_span`; plain torch, so training can back-propagate
    through it."""
    from open_clip.transformer import text_global_pool

    length = ids.shape[1]
    attn_mask = t["attn_mask"]
    cast_dtype = t["transformer"].get_cast_dtype()
    x = t["token_embedding"](ids).to(cast_dtype)
    x = x + t["positional_embedding"][:length].to(cast_dtype)
    x = t["transformer"](x, attn_mask=attn_mask[:length, :length] if attn_mask is not None else None)
    x = t["ln_final"](x)
    pool_type, eos_id = t["pool_type"], t["eos_id"]
    pooled = text_global_pool(x, ids, pool_type, eos_token_id=eos_id)
    projection = t["projection"]
    if isinstance(projection, torch.nn.Linear):
        native, tokens = projection(pooled), projection(x)
    else:
        native, tokens = pooled @ projection, x @ projection
    return native, tokens, _text_mask(ids, pool_type, eos_id, t["pad_id"])


def _text_mask(ids: torch.Tensor, pool_type: str, eos_id, pad_id: int) -> torch.Tensor:
    """[B, L] True on SOT..EOT (the positions the native pooling can read), from the ids alone."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    if pool_type == "argmax":
        return positions[None, :] <= ids.argmax(dim=-1, keepdim=True)
    if pool_type == "eos":
        return positions[None, :] <= (ids == eos_id).int().argmax(dim=-1, keepdim=True)
    return ids != pad_id


def _check_vit(visual, name: str) -> None:
    if visual.attn_pool is not None:
        raise UnsupportedModel(
            f"model {quoted(name)}: attentional-pool (CoCa-style) ViT tokens are learned queries, "
            f"not patches; embedsvc pools patch tokens of plain ViTs only"
        )
    if visual.pool_type not in ("tok", "avg"):
        raise UnsupportedModel(
            f"model {quoted(name)}: ViT pool_type {quoted(visual.pool_type)} has no native pooled output"
        )
    if visual.proj is None:
        raise UnsupportedModel(f"model {quoted(name)}: ViT has no projection to the joint space")


def text_tower(model, name: str) -> dict:
    """The text tower's parts, for open_clip's CLIP (flattened tower) and CustomTextCLIP alike."""
    from open_clip.transformer import TextTransformer

    if hasattr(model, "token_embedding"):  # CLIP keeps the text tower's modules on the model itself
        return {
            "token_embedding": model.token_embedding,
            "positional_embedding": model.positional_embedding,
            "transformer": model.transformer,
            "attn_mask": model.attn_mask,
            "ln_final": model.ln_final,
            "projection": model.text_projection,
            "pool_type": model.text_pool_type,
            "eos_id": getattr(model, "text_eos_id", None),
            "pad_id": 0,
        }
    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer) and text.cls_emb is None and not text.use_pad_mask:
        return {
            "token_embedding": text.token_embedding,
            "positional_embedding": text.positional_embedding,
            "transformer": text.transformer,
            "attn_mask": text.attn_mask,
            "ln_final": text.ln_final,
            "projection": text.text_projection,
            "pool_type": text.pool_type,
            "eos_id": text.eos_id,
            "pad_id": text.pad_id,
        }
    raise UnsupportedModel(
        f"model {quoted(name)}: text tower {type(text).__name__} exposes no token features embedsvc "
        f"can pool; use an open_clip model with the built-in text transformer"
    )
