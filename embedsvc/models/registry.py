"""The model registry: a dict of named specs, plus ad-hoc specs built from an architecture name.

A spec says which open_clip architecture to build and where its weights come from: an open_clip
pretrained tag (resolved from the local cache only), a local checkpoint file, the package's bundled
assets, or random initialisation (tests and benchmarks only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from embedsvc.errors import InvalidInput, UnknownModel, quoted


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to load one model."""

    # Registry name, used in the proto, the CLI and collection configs.
    name: str
    # open_clip architecture name (built-in, or the stem of `config_file`).
    architecture: str
    # open_clip pretrained tag (e.g. "laion2b_s34b_b79k"); weights must already be in the local cache.
    pretrained: str | None = None
    # Local checkpoint in open_clip state-dict format (.pt, .pth, .bin or .safetensors).
    checkpoint: str | None = None
    # open_clip model-config JSON for an architecture open_clip does not ship; registered on load.
    config_file: str | None = None
    # Build with random weights. Only for tests and benchmarks: retrieval results are meaningless.
    random_init: bool = False
    # One line for ListModels.
    description: str = ""

    def __post_init__(self) -> None:
        sources = [self.pretrained is not None, self.checkpoint is not None, self.random_init]
        if sum(sources) != 1:
            raise InvalidInput(
                f"model {quoted(self.name)}: give exactly one weight source (pretrained tag, checkpoint file, "
                f"or random_init=True), got {sum(sources)}"
            )

    @property
    def weights(self) -> str:
        """A short human description of where the weights come from."""
        if self.pretrained is not None:
            return f"pretrained:{self.pretrained}"
        if self.checkpoint is not None:
            return f"checkpoint:{self.checkpoint}"
        return "random"


MODEL_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Adds a spec to the registry; a name is registered once unless `replace` is set."""
    if spec.name in MODEL_REGISTRY and not replace and MODEL_REGISTRY[spec.name] != spec:
        raise InvalidInput(f"model name {quoted(spec.name)} is already registered with another spec")
    MODEL_REGISTRY[spec.name] = spec
    return spec


def get_model_spec(name: str) -> ModelSpec:
    """Looks a name up in the registry."""
    try:
        return MODEL_REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_REGISTRY)) or "none"
        raise UnknownModel(
            f"unknown model {quoted(name)}; registered models: {known}. To load an open_clip architecture, "
            f"give its name with a weight source (--pretrained TAG or --checkpoint PATH)"
        ) from None


def resolve_model_spec(
    name: str,
    *,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    random_init: bool = False,
    config_file: str | None = None,
) -> ModelSpec:
    """A registered name, or (with a weight source) an open_clip architecture built ad hoc; `config_file`
    registers an architecture open_clip does not ship (named after the file's stem)."""
    if pretrained is None and checkpoint is None and not random_init:
        return get_model_spec(name)
    import open_clip  # deferred: importing it costs a second and not every caller needs it

    if config_file is not None:
        path = Path(config_file).expanduser()
        if not path.is_file():
            raise InvalidInput(f"model config {path} does not exist")
        if path.stem != name:
            raise InvalidInput(f"model config {path.name} must be named {name}.json (its stem names the architecture)")
        open_clip.add_model_config(str(path))
        config_file = str(path)
    if name not in open_clip.list_models():
        raise UnknownModel(
            f"unknown open_clip architecture {quoted(name)}; see open_clip.list_models() (e.g. ViT-B-32, RN50)"
        )
    if checkpoint is not None:
        checkpoint = str(Path(checkpoint).expanduser())
    return ModelSpec(
        name=name,
        architecture=name,
        pretrained=pretrained,
        checkpoint=checkpoint,
        random_init=random_init,
        config_file=config_file,
    )


def register_models_file(path: str | Path) -> list[ModelSpec]:
    """Registers every spec of a models file (a JSON list; relative paths are relative to the file)."""
    import dataclasses
    import json

    from embedsvc.errors import quoted

    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidInput(f"models file {path} does not exist")
    try:
        entries = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"models file {path}: cannot read it as JSON ({exc})") from None
    shape = 'a list of {"name", "architecture", "checkpoint" | "pretrained", "config_file"}'
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InvalidInput(f"models file {path}: expected {shape}")
    specs = []
    for entry in entries:
        for key in ("checkpoint", "config_file"):
            if isinstance(entry.get(key), str) and entry[key] and not Path(entry[key]).is_absolute():
                entry[key] = str(path.parent / entry[key])
        unknown = set(entry) - {f.name for f in dataclasses.fields(ModelSpec)}
        if unknown:
            raise InvalidInput(
                f"models file {path}: unknown key(s) {', '.join(sorted(map(quoted, unknown)))}; expected {shape}"
            )
        try:
            spec = ModelSpec(**entry)
        except TypeError as exc:  # a required key missing
            raise InvalidInput(f"models file {path}: {exc}; expected {shape}") from None
        specs.append(register_model(spec, replace=True))
    return specs


@dataclass(frozen=True)
class ModelOptions:
    """The model a command runs, as the CLI's one model option group gives it (see embedsvc/cli/models.py)."""

    # Registered name (bundled or from the models file), or an open_clip architecture with a weight source;
    # "" = `default` (or, with a checkpoint, the checkpoint's file stem).
    model: str = ""
    # open_clip pretrained tag, resolved from the local caches only.
    pretrained: str | None = None
    # Local open_clip state dict.
    checkpoint: str | None = None
    # open_clip model-config JSON for an architecture open_clip does not ship ("" with a checkpoint: the
    # NAME.json beside it, when there is one, as `embedsvc train` writes them).
    model_config: str | None = None
    # JSON list of model specs to register first.
    models_file: str | None = None
    # Random weights (tests and smoke runs only).
    random_init: bool = False

    @property
    def has_weight_source(self) -> bool:
        return self.pretrained is not None or self.checkpoint is not None or self.random_init


def spec_from_options(options: ModelOptions, default: str = "") -> ModelSpec:
    """Resolves (and registers, so that the engine and collections can name it) the model of `options`."""
    if options.models_file:
        register_models_file(options.models_file)
    name, config_file = options.model, options.model_config
    if options.checkpoint is not None:
        checkpoint = Path(options.checkpoint).expanduser()
        if not checkpoint.is_file():
            raise InvalidInput(f"checkpoint {checkpoint} does not exist")
        name = name or checkpoint.stem
        beside = checkpoint.with_name(f"{name}.json")
        if config_file is None and beside.is_file():
            config_file = str(beside)
    name = name or default
    if not name:
        raise InvalidInput("name a model: --model NAME (or --checkpoint PATH)")
    if config_file is not None and not options.has_weight_source:
        raise InvalidInput("--model-config describes an architecture: give its weights too (--checkpoint PATH)")
    spec = resolve_model_spec(
        name,
        pretrained=options.pretrained,
        checkpoint=options.checkpoint,
        random_init=options.random_init,
        config_file=config_file,
    )
    return register_model(spec, replace=True) if options.has_weight_source else spec
