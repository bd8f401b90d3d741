"""The pooling registry: names -> definitions, and binding a (name, params) spec to a callable.

A definition parses and validates its parameters into a typed dataclass, says which modalities it
accepts, and maps TokenFeatures to vectors with the pure functions of this package. Every output is
L2-normalised here, once.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from embedsvc.errors import (
    InvalidPoolingParams,
    ModalityNotSupported,
    NonFiniteVector,
    PoolingNotFitted,
    UnknownPooling,
    UnsupportedTokenMode,
    quoted,
)
from embedsvc.pooling.features import FINAL, IMAGE, TEXT, TokenFeatures, TokenMode
from embedsvc.pooling.functional import l2_normalize, masked_max, masked_mean, signed_gem
from embedsvc.pooling.netvlad import NetVLADState
from embedsvc.pooling.spp import spatial_pyramid
from embedsvc.spec_text import SpecTextError, parse_spec_text

# -- parameters -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoParams:
    """Poolings without parameters."""


@dataclass(frozen=True)
class TokenParams:
    # Token mode of the image patch tokens pooled (docs/pooling.md): final (the model's own), maskclip,
    # clearclip, sclip, naclip (ViT towers only). Texts always pool their own (final) tokens.
    tokens: TokenMode = FINAL


@dataclass(frozen=True)
class GemParams:
    # Generalised-mean exponent: 1 is the mean, large values approach the max. Range (0, 64].
    p: float = 3.0
    # Token mode of the image patch tokens pooled (see TokenParams).
    tokens: TokenMode = FINAL

    def validate(self) -> None:
        if not 0 < self.p <= 64:
            raise InvalidPoolingParams(f"gem: p must be in (0, 64], got {self.p}")


@dataclass(frozen=True)
class NetVLADParams:
    # Number of codebook clusters K; the output has K*D dimensions (before PCA).
    clusters: int = 16
    # Soft-assignment sharpness; 0 chooses it from the data when fitting (nearest centroid ~100x the second).
    alpha: float = 0.0
    # PCA-whitening output dimension; 0 keeps the K*D VLAD vector.
    pca_dim: int = 0
    # What a text is aggregated from: its tokens (SOT..EOT) or its native vector as a single descriptor.
    text_descriptors: Literal["tokens", "native"] = "tokens"
    # Token mode of the image patch tokens aggregated (see TokenParams); the codebook is fitted on them.
    tokens: TokenMode = FINAL

    def validate(self) -> None:
        if not 2 <= self.clusters <= 1024:
            raise InvalidPoolingParams(f"netvlad: clusters must be in [2, 1024], got {self.clusters}")
        if self.alpha < 0:
            raise InvalidPoolingParams(f"netvlad: alpha must be >= 0 (0 = fitted from data), got {self.alpha}")
        if self.pca_dim < 0:
            raise InvalidPoolingParams(f"netvlad: pca_dim must be >= 0 (0 = no PCA), got {self.pca_dim}")


@dataclass(frozen=True)
class SppParams:
    # Pyramid levels: level l splits the grid into l x l regions. Written "1,2,4" in params.
    levels: tuple[int, ...] = (1, 2, 4)
    # How a region is pooled.
    region: Literal["max", "avg"] = "max"
    # "sum": L2 per region, summed, L2 (D dims, text-comparable); "concat": sum(l^2)*D dims, image only.
    combine: Literal["sum", "concat"] = "sum"
    # Token mode of the image patch tokens pooled (see TokenParams).
    tokens: TokenMode = FINAL

    def validate(self) -> None:
        if not self.levels or any(not 1 <= level <= 16 for level in self.levels):
            raise InvalidPoolingParams(f"spp: levels must be 1 to 16 each, e.g. '1,2,4'; got {self.levels}")
        if len(set(self.levels)) != len(self.levels):
            raise InvalidPoolingParams(f"spp: levels must be distinct, got {self.levels}")


def parse_params(name: str, cls: type, raw: Mapping[str, Any]) -> Any:
    """Builds a params dataclass from strings or values, refusing unknown keys and bad values."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        allowed = ", ".join(fields) or "none"
        raise InvalidPoolingParams(f"{name}: unknown parameter(s) {', '.join(unknown)}; allowed: {allowed}")
    hints = _type_hints(cls)
    values = {}
    for key, value in raw.items():
        values[key] = _coerce(name, key, hints[key], value)
    params = cls(**values)
    if hasattr(params, "validate"):
        params.validate()
    return params


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """typing.get_type_hints of a params class, resolved once: it re-evaluates the annotations on every call, and
    every Embed binds its poolings."""
    return typing.get_type_hints(cls)


def _coerce(name: str, key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    try:
        if origin is Literal:
            choices = typing.get_args(hint)
            if value not in choices:
                raise ValueError(f"choose one of {', '.join(choices)}")
            return value
        if origin is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(int(str(item).strip()) for item in items)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("not an integer")
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        if hint is float:
            result = float(value)
            if result != result or result in (float("inf"), float("-inf")):
                raise ValueError("not finite")
            return result
        return value
    except (TypeError, ValueError) as exc:
        raise InvalidPoolingParams(f"{name}: bad value {quoted(value)} for {key}: {exc}") from None


def params_to_strings(params: Any) -> dict[str, str]:
    """The inverse of parse_params, for configs and the proto."""
    out = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        out[f.name] = ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)
    return out


# -- definitions ----------------------------------------------------------------------------------

PoolFn = Callable[[TokenFeatures, Any, NetVLADState | None], torch.Tensor]


@dataclass(frozen=True)
class PoolingDef:
    """A registered pooling."""

    # Registry name.
    name: str
    # One line for ListModels and --help.
    description: str
    # Params dataclass.
    params_cls: type
    # (features, params, state) -> [B, out] unnormalised.
    fn: PoolFn
    # Modalities accepted; `refuses` can still refuse per params.
    modalities: tuple[str, ...] = (IMAGE, TEXT)
    # Needs fitted state before use.
    requires_fit: bool = False
    # (params, modality) -> reason string when this combination is refused, else None.
    refuses: Callable[[Any, str], str | None] = lambda params, modality: None
    # (params, embed_dim, state) -> output dimension.
    output_dim: Callable[[Any, int, NetVLADState | None], int] = lambda params, dim, state: dim


def _cls(f: TokenFeatures, params: NoParams, state) -> torch.Tensor:
    return f.native


def _avg(f: TokenFeatures, params: NoParams, state) -> torch.Tensor:
    return masked_mean(f.tokens, f.mask)


def _max(f: TokenFeatures, params: NoParams, state) -> torch.Tensor:
    return masked_max(f.tokens, f.mask)


def _gem(f: TokenFeatures, params: GemParams, state) -> torch.Tensor:
    return signed_gem(f.tokens, f.mask, params.p)


def _netvlad(f: TokenFeatures, params: NetVLADParams, state: NetVLADState | None) -> torch.Tensor:
    assert state is not None, "BoundPooling.check_ready refuses an unfitted netvlad"
    if f.modality == TEXT and params.text_descriptors == "native":
        return state(f.native.unsqueeze(1), torch.ones_like(f.mask[:, :1]))
    return state(f.tokens, f.mask)


def _spp(f: TokenFeatures, params: SppParams, state) -> torch.Tensor:
    if f.modality == TEXT:  # a sentence has one region, itself: its native embedding
        return f.native
    assert f.grid is not None  # image tokens come with their grid
    return spatial_pyramid(f.tokens, f.grid, params.levels, params.region, params.combine)


def _spp_refuses(params: SppParams, modality: str) -> str | None:
    if modality == TEXT and params.combine == "concat":
        return (
            "spp with combine=concat has sum(l^2)*D dimensions that no text vector can match; "
            "use combine=sum for text queries, or image queries only"
        )
    return None


POOLINGS: dict[str, PoolingDef] = {
    d.name: d
    for d in (
        PoolingDef("cls", "the model's native pooled embedding (open_clip encode_image / encode_text)", NoParams, _cls),
        PoolingDef("avg", "global average of the tokens (patches; text SOT..EOT)", TokenParams, _avg),
        PoolingDef("max", "global max per dimension over the tokens", TokenParams, _max),
        PoolingDef(
            "gem", "generalised mean with exponent p, signed: sign(m)|m|^(1/p), m = mean(sign(x)|x|^p)", GemParams, _gem
        ),
        PoolingDef(
            "netvlad",
            "NetVLAD residual aggregation over a fitted k-means codebook (K*D or PCA dims)",
            NetVLADParams,
            _netvlad,
            requires_fit=True,
            output_dim=lambda p, dim, state: state.output_dim if state is not None else (p.pca_dim or p.clusters * dim),
        ),
        PoolingDef(
            "spp",
            "spatial pyramid over the patch grid: per-region max/avg, L2, summed (or concatenated)",
            SppParams,
            _spp,
            refuses=_spp_refuses,
            output_dim=lambda p, dim, state: (
                dim if p.combine == "sum" else dim * sum(level * level for level in p.levels)
            ),
        ),
    )
}


# -- binding --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolingSpec:
    """A pooling by name with raw parameters, as it arrives from the proto, the CLI or a config."""

    # Registry name.
    name: str = "cls"
    # Parameter values (strings from the wire, or typed values from Python).
    params: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> PoolingSpec:
        """'gem', 'gem:p=4', 'avg:tokens=clearclip' or 'spp:levels=1,2;combine=concat' (';' separates
        parameters)."""
        try:
            name, params = parse_spec_text(text)
        except SpecTextError as exc:
            message = f"{exc.name}: parameter {quoted(exc.part)} must be written key=value"
            raise InvalidPoolingParams(message) from None
        return cls(name, params)


@dataclass
class BoundPooling:
    """A pooling definition with parsed parameters and, if it learns, its state."""

    definition: PoolingDef
    params: Any
    state: NetVLADState | None = None
    # A collection's pooling: texts (queries) pool the text tower's own tokens whatever the image token
    # mode. Otherwise (Embed) a text input with a token mode other than `final` is refused.
    text_final_tokens: bool = False

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def token_mode(self) -> str:
        """The token mode of the image patch tokens this pooling reads."""
        return getattr(self.params, "tokens", FINAL)

    def mode_for(self, modality: str) -> str:
        return FINAL if modality == TEXT else self.token_mode

    def output_dim(self, embed_dim: int) -> int:
        return self.definition.output_dim(self.params, embed_dim, self.state)

    def check_modality(self, modality: str) -> None:
        reason = None
        if modality not in self.definition.modalities:
            reason = f"{self.name} does not apply to {modality} inputs"
        reason = reason or self.definition.refuses(self.params, modality)
        if reason:
            raise ModalityNotSupported(reason)
        if modality == TEXT and self.token_mode != FINAL and not self.text_final_tokens:
            raise UnsupportedTokenMode(
                f"{self.name}: tokens={self.token_mode} does not apply to text inputs: the "
                f"text tower has one token mode, {FINAL}; embed texts with tokens={FINAL} "
                f"(collections do this for text queries)"
            )

    def check_ready(self) -> None:
        """Refuses a learned pooling without state, before any compute is spent on it."""
        if self.definition.requires_fit and self.state is None:
            raise PoolingNotFitted(
                f"{self.name} has no fitted codebook: fit it first (`embedsvc collections fit "
                f"NAME SOURCE`, or the FitPooling RPC), or give `embedsvc embed` a saved state "
                f"(--pooling-state FILE, e.g. one `embedsvc compare` wrote)"
            )

    def __call__(self, features: TokenFeatures) -> torch.Tensor:
        """[B, out] L2-normalised float32 vectors."""
        self.check_ready()
        self.check_modality(features.modality)
        features = features.in_mode(self.mode_for(features.modality))
        out = l2_normalize(self.definition.fn(features, self.params, self.state).float())
        if not torch.isfinite(out).all():  # a last wall: no pooling answers OK with NaN or infinity
            raise NonFiniteVector(
                f"pooling {self.name} produced a non-finite vector for this input (numerical "
                f"overflow); try other parameters or another pooling"
            )
        return out


def image_token_modes(poolings: list[BoundPooling]) -> tuple[str, ...]:
    """The token modes an image forward pass must compute to feed all these poolings (native and
    `cls` come with every mode); `final` when none needs patch tokens."""
    return tuple(dict.fromkeys(p.token_mode for p in poolings)) or (FINAL,)


def bind_pooling(
    spec: PoolingSpec | str, state: NetVLADState | None = None, text_final_tokens: bool = False
) -> BoundPooling:
    """Resolves a spec against the registry and validates its parameters."""
    if isinstance(spec, str):
        spec = PoolingSpec.parse(spec)
    try:
        definition = POOLINGS[spec.name]
    except KeyError:
        raise UnknownPooling(f"unknown pooling {quoted(spec.name)}; available: {', '.join(POOLINGS)}") from None
    params = parse_params(spec.name, definition.params_cls, dict(spec.params))
    return BoundPooling(definition, params, state, text_final_tokens)


def apply_poolings(features: TokenFeatures, poolings: list[BoundPooling]) -> list[torch.Tensor]:
    """Feeds one forward pass's features to several poolings."""
    return [pooling(features) for pooling in poolings]
