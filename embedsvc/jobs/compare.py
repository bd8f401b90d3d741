"""`embedsvc compare`: which pooling retrieves best, how fast, at what memory, on a captioned data set.

For each pooling it embeds the corpus (one forward pass per tower feeds every pooling), fits NetVLAD
on the corpus' own token features, builds a real collection (durable store, chosen index preset) and
measures: text->image, image->text and image->image recall@1/5/10, median rank and mAP, each beside its
chance level (exact, from the vectors, with eval helpers; relevance by label column when the manifest has
one, else by identical caption: see embedsvc.eval.metrics); encode time (the shared forward plus the pooling's
own time); index build time; search latency p50/p99 of text queries through the store; bytes per vector (serialised
index size / items). Writes results.md, results.json and two PNG plots. Manifest rows whose image is
missing or unreadable are skipped and reported by path, like `embedsvc index` does.

Nothing is cut or left out silently: a manifest is compared whole unless `size` asks for fewer rows (or it
has more than MAX_DEFAULT_PAIRS), and then on a seeded random sample, announced with its counts, never its
first rows (which may all be one vendor's or one class's); a task with nothing to measure is reported as not
measured, with why, never as 0.000.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from embedsvc.encoder import ClipEncoder
from embedsvc.encoder.images import split_by_resized_size
from embedsvc.errors import InvalidInput, ModalityNotSupported
from embedsvc.eval import TASKS, cross_modal_metrics, not_measured, relevance_summary
from embedsvc.models.registry import ModelOptions
from embedsvc.pooling import BoundPooling, bind_pooling, fit_netvlad, image_token_modes
from embedsvc.pooling.features import FINAL
from embedsvc.progress import Progress

DEFAULT_POOLINGS = ("cls", "avg", "max", "gem:p=3", "netvlad:clusters=16", "spp")
# Scenes compared when no size is given (the generated test split has no end).
DEFAULT_SCENES = 1000
# Manifest rows compared when no size is given: every decoded image and the N x N similarities are held in
# memory, so a larger manifest is sampled (announced) rather than exhausting it.
MAX_DEFAULT_PAIRS = 10_000


@dataclass
class CompareJob:
    # "scenes" (the generated test split) or a CSV/JSONL manifest with captions.
    data: str = "scenes"
    # Pairs to use. Scenes: the first N of the test split (None: DEFAULT_SCENES). Manifest: None compares every
    # row with a caption (a random sample of MAX_DEFAULT_PAIRS beyond that); N draws a random sample of N.
    size: int | None = None
    # Seed of the random sample of manifest rows (the same seed, the same rows); None: 0. The scenes data has no
    # sample to seed (the first `size` scenes of the test split), so a seed given with it is refused, not ignored.
    seed: int | None = None
    # Poolings to compare (registry specs).
    poolings: tuple[str, ...] = DEFAULT_POOLINGS
    # Index preset for the collections.
    index: str = "flat"
    # Model: a registry name ("" = the bundled model) or the CLI's model options (e.g. a trained checkpoint).
    model: str | ModelOptions = ""
    # Manifest column whose equal values make images relevant to each other and to each other's captions;
    # "auto": "label", else "class", when the manifest has it; "" = relevance by identical caption only.
    label_column: str = "auto"
    # Output folder for results.md, results.json and the plots.
    out_dir: str = "compare-out"
    # Text queries timed through the store per pooling.
    latency_queries: int = 200
    # Also train an attention-pooling head on frozen tokens of this many training-split scenes (0: no head).
    # Scenes data only: the head needs a training split disjoint from the evaluated test split.
    train_head: int = 0
    # Optimiser steps for the head.
    head_steps: int = 400


@dataclass
class Pairs:
    """The evaluated corpus: image i with caption i, plus what relevance is computed from."""

    images: list
    captions: list[str]
    ids: list[str]
    # Scenes: the colour-shape multiset per image (image->image relevance without labels).
    keys: list | None = None
    # Values of the label column per image, or None.
    labels: list | None = None
    label_column: str = ""
    # Manifest rows that could not be used: (path, reason).
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # Per image: the manifest row's file (empty for scenes).
    sources: list[str] = field(default_factory=list)
    # How the manifest was cut, when it was (see Sample); None when every row with a caption was used.
    sample: Sample | None = None

    def drop_oversized(self, short_side: int) -> None:
        """Skips images that the model's resize (shorter side to `short_side`) would blow past the pixel
        limit, as the server refuses them: a 100000x1 strip must not allocate gigapixels here either."""
        keep, refused = split_by_resized_size(self.images, short_side)
        self.skipped += [(self.sources[i] if self.sources else self.ids[i], reason) for i, reason in refused.items()]
        if len(keep) == len(self.images):
            return
        if not keep:
            raise InvalidInput(
                f"no usable image-caption pairs ({len(self.skipped)} rows skipped, e.g. "
                f"{self.skipped[0][0]}: {self.skipped[0][1]})"
            )
        for name in ("images", "captions", "ids", "keys", "labels", "sources"):
            values = getattr(self, name)
            if values:
                setattr(self, name, [values[i] for i in keep])
        if self.sample is not None:
            self.sample.used, self.sample.ids = len(self.ids), list(self.ids)


@dataclass
class Sample:
    """A cut of the manifest: `used` usable rows drawn at random (seeded) from its `rows` rows with a caption."""

    rows: int
    used: int
    seed: int
    # Why there was a cut: the size asked for, or the default's cap.
    reason: str
    # The ids compared, in manifest order.
    ids: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (
            f"compared a random sample of {self.used} of the {self.rows} manifest rows with a caption "
            f"(seed {self.seed}; {self.reason})"
        )


def _label_column(job: CompareJob, rows) -> str:
    columns = set().union(*(r.metadata for r in rows))
    if job.label_column != "auto":
        if job.label_column and job.label_column not in columns:
            raise InvalidInput(f"{job.data} has no column {job.label_column!r} (columns: {', '.join(sorted(columns))})")
        return job.label_column
    return next((c for c in ("label", "class") if c in columns), "")


def _scene_pairs(job: CompareJob, image_size: int) -> Pairs:
    from embedsvc.datasets import full_caption, generate_scene, render_scene

    scenes = [generate_scene("test", i) for i in range(job.size or DEFAULT_SCENES)]
    return Pairs(
        [render_scene(s, image_size) for s in scenes],
        [full_caption(s) for s in scenes],
        [s.id for s in scenes],
        keys=[s.object_key() for s in scenes],
    )


def _manifest_pairs(job: CompareJob, short_side: int) -> Pairs:
    """Read and decoded (at the model's input size, `short_side`) before the model loads: a manifest with
    nothing usable fails at once."""
    from embedsvc.jobs.index import decode_record
    from embedsvc.jobs.sources import manifest_records

    rows = [r for r in manifest_records(Path(job.data)) if r.caption]
    if not rows:
        raise InvalidInput(f"{job.data} has no rows with a caption to compare on")
    column = _label_column(job, rows)
    pairs = Pairs([], [], [], labels=[] if column else None, label_column=column)
    limit, reason = _limit(job, len(rows))
    seed = 0 if job.seed is None else job.seed
    order = range(len(rows)) if limit is None else np.random.default_rng(seed).permutation(len(rows)).tolist()
    kept: list[tuple] = []  # (manifest index, row, image): decoded in sampling order until `limit` are usable
    for index in order:
        if limit is not None and len(kept) == limit:
            break
        row = rows[index]
        if column and column not in row.metadata:
            pairs.skipped.append((row.source, f"no {column!r} value"))
            continue
        decoded = decode_record(row, short_side, keep_bytes=False)
        if decoded.image is None:
            pairs.skipped.append((row.source, decoded.reason))
            continue
        kept.append((index, row, decoded.image))
    for _, row, image in sorted(kept, key=lambda k: k[0]):  # manifest order, whichever way they were drawn
        pairs.images.append(image)
        pairs.sources.append(row.source)
        assert row.caption is not None  # rows without one were left out
        pairs.captions.append(row.caption)
        pairs.ids.append(row.id)
        if pairs.labels is not None:  # a label column
            pairs.labels.append(row.metadata[column])
    if limit is not None:
        pairs.sample = Sample(len(rows), len(pairs.ids), seed, reason, list(pairs.ids))
    if not pairs.ids:
        raise InvalidInput(
            f"{job.data}: no usable image-caption pairs ({len(pairs.skipped)} rows skipped, e.g. "
            f"{pairs.skipped[0][0]}: {pairs.skipped[0][1]})"
        )
    return pairs


def _encode(encoder: ClipEncoder, images: list, captions: list[str], modes: tuple[str, ...]):
    """(image features, text features) of the pairs, encoded a batch at a time with a progress line: a large
    set takes minutes."""
    from embedsvc.pooling.features import TokenFeatures

    progress = Progress(len(images) + len(captions), unit="inputs", label="encoded ")
    step = 256
    parts: tuple[list, list] = ([], [])
    for start in range(0, max(len(images), len(captions)), step):
        if start < len(images):
            parts[0].append(encoder.encode_images(images[start : start + step], modes))
        if start < len(captions):
            parts[1].append(encoder.encode_texts(captions[start : start + step]))
        progress.update(min(len(images), start + step) + min(len(captions), start + step))
    return TokenFeatures.concat(parts[0]), TokenFeatures.concat(parts[1])


def _limit(job: CompareJob, rows: int) -> tuple[int | None, str]:
    """How many of `rows` manifest rows to draw at random and why; (None, "") to use them all."""
    if job.size is None and rows > MAX_DEFAULT_PAIRS:
        return MAX_DEFAULT_PAIRS, (
            f"the default caps at {MAX_DEFAULT_PAIRS:,}, as every image and the pairs' "
            f"similarities are held in memory; --size N chooses another sample size"
        )
    if job.size is not None and job.size < rows:
        return job.size, f"--size {job.size}; leave --size out to compare every row"
    return None, ""


def _measure(image_vectors, text_vectors, pairs: Pairs, spec: str) -> tuple[dict, dict[str, str]]:
    """The measured tasks' metrics, and why each other task was not measured."""
    groups = {"captions": pairs.captions, "labels": pairs.labels, "image_keys": pairs.keys}
    if text_vectors is not None:
        metrics = cross_modal_metrics(image_vectors, text_vectors, **groups)
    else:  # an image-only pooling: image->image from the image vectors alone
        metrics = {
            task: m
            for task, m in cross_modal_metrics(image_vectors, image_vectors, **groups).items()
            if task == "image_to_image"
        }
    reasons = not_measured(metrics, labels=pairs.labels is not None, image_keys=pairs.keys is not None)
    if text_vectors is None:
        reasons.update(dict.fromkeys(TASKS[:2], f"{spec} pools images only (texts refused)"))
    return {task: m.as_dict() for task, m in metrics.items()}, reasons


def run_compare(job: CompareJob) -> dict:
    import torch

    from embedsvc.models import DEFAULT_MODEL, input_size, load_model, spec_from_options
    from embedsvc.store import CollectionConfig, Item, LocalStore, SearchOptions

    if job.size is not None and job.size < 1:
        raise InvalidInput(f"--size must be at least 1, got {job.size} (leave it out to compare every manifest row)")
    if job.data == "scenes" and job.seed is not None:
        raise InvalidInput(
            f"--seed {job.seed} seeds the random sample of a manifest's rows; the scenes data is the "
            f"first --size scenes of its test split, always the same: leave --seed out"
        )
    options = job.model if isinstance(job.model, ModelOptions) else ModelOptions(model=job.model)
    model_spec = spec_from_options(options, default=DEFAULT_MODEL)
    pairs = _manifest_pairs(job, input_size(model_spec)) if job.data != "scenes" else None
    encoder = ClipEncoder(load_model(model_spec))
    pairs = pairs or _scene_pairs(job, encoder.loaded.image_size)
    pairs.drop_oversized(encoder.loaded.image_size)
    images, captions, ids = pairs.images, pairs.captions, pairs.ids
    started = time.perf_counter()
    # one pass computes every token mode the poolings ask for (rows are pooling x token mode)
    modes = tuple(dict.fromkeys((FINAL, *image_token_modes([bind_pooling(s) for s in job.poolings]))))
    image_features, text_features = _encode(encoder, images, captions, modes)
    forward_seconds = time.perf_counter() - started
    heads = {}
    if job.train_head:
        heads["attention-head (trained)"] = _train_head(job, encoder)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        store = LocalStore(folder)
        specs = [*job.poolings, *heads]
        progress = Progress(len(specs), unit="poolings", label="pooling ")
        for number, spec in enumerate(specs):
            progress.update(number)
            state = None
            fit_seconds = 0.0
            if spec in heads:
                head, fit_seconds = heads[spec]
                pooling: _HeadPooling | BoundPooling = _HeadPooling(head)
            elif spec.split(":")[0] == "netvlad":
                t = time.perf_counter()
                probe = bind_pooling(spec)
                p = probe.params
                tokens = image_features.in_mode(probe.token_mode).tokens
                state = fit_netvlad([(tokens, image_features.mask)], p.clusters, p.alpha, p.pca_dim)
                fit_seconds = time.perf_counter() - t
                Path(job.out_dir).mkdir(parents=True, exist_ok=True)  # reusable: `embed --pooling-state FILE`
                state.save(Path(job.out_dir) / f"state-{spec.replace(':', '-').replace(';', '-')}.safetensors")
            if spec not in heads:
                pooling = bind_pooling(spec, state, text_final_tokens=True)  # texts as a collection pools them
            t = time.perf_counter()
            image_vectors = pooling(image_features).numpy()
            pooling_seconds = time.perf_counter() - t
            try:
                text_vectors = pooling(text_features).numpy()
            except ModalityNotSupported:  # image-only pooling: image->image only
                text_vectors = None
            name = f"cmp-{number}"
            t = time.perf_counter()
            store.create_collection(CollectionConfig(name, image_vectors.shape[1], index=job.index))
            store.upsert(name, [Item(i, v) for i, v in zip(ids, image_vectors)])
            build_seconds = time.perf_counter() - t
            latencies = []
            queries = text_vectors if text_vectors is not None else image_vectors
            for q in queries[: job.latency_queries]:
                t = time.perf_counter()
                store.search(name, q[None], SearchOptions(10))
                latencies.append((time.perf_counter() - t) * 1000)
            bytes_per_vector = store.index_size_bytes(name) / len(ids)
            metrics, unmeasured = _measure(image_vectors, text_vectors, pairs, spec)
            rows.append(
                {
                    "pooling": spec,
                    "tokens": getattr(pooling, "token_mode", FINAL),
                    "dim": int(image_vectors.shape[1]),
                    "metrics": metrics,
                    "not_measured": unmeasured,
                    "encode_ms_per_item": 1000 * (forward_seconds + pooling_seconds * 2) / (2 * len(ids)),
                    "fit_seconds": fit_seconds,
                    "index_build_seconds": build_seconds,
                    "search_p50_ms": float(np.percentile(latencies, 50)),
                    "search_p99_ms": float(np.percentile(latencies, 99)),
                    "bytes_per_vector": bytes_per_vector,
                }
            )
        store.close()
        progress.update(len(specs))
    result = {
        "data": job.data,
        "size": len(ids),
        "sample": asdict(pairs.sample) if pairs.sample else None,
        "model": encoder.loaded.spec.name,
        "index": job.index,
        "device": str(encoder.device),
        "torch_threads": torch.get_num_threads(),
        "relevance": relevance_summary(captions, pairs.labels, pairs.label_column),
        "skipped": [{"path": p, "reason": r} for p, r in pairs.skipped],
        "poolings": rows,
    }
    _write(job, result)
    return result


class _HeadPooling:
    """A trained head used like a pooling: images through the head, texts by their native vector."""

    def __init__(self, head):
        self.head = head

    def __call__(self, features):
        import torch

        from embedsvc.pooling import l2_normalize
        from embedsvc.pooling.features import TEXT

        with torch.no_grad():
            if features.modality == TEXT:
                return l2_normalize(features.native)
            return l2_normalize(self.head(features.tokens, features.mask))


def _train_head(job: CompareJob, encoder):
    """Trains the head on the scenes' train split: image tokens against the native embedding of a
    caption of the same image (the full caption, or another of its captions)."""

    from embedsvc.datasets import generate_scene, render_scene, scene_captions
    from embedsvc.pooling.attention import train_attention_head

    if job.data != "scenes":
        raise InvalidInput("--train-head needs the scenes data (its train split); manifests have no split")
    started = time.perf_counter()
    scenes = [generate_scene("train", i) for i in range(job.train_head)]
    features = encoder.encode_images([render_scene(s, encoder.loaded.image_size) for s in scenes])
    rng = np.random.default_rng(0)
    captions = [c[0] if rng.random() < 0.7 else c[int(rng.integers(len(c)))] for c in map(scene_captions, scenes)]
    targets = encoder.encode_texts(captions).native
    head = train_attention_head(features.tokens, features.mask, targets, steps=job.head_steps)
    return head, time.perf_counter() - started


_COLUMNS = [
    ("text_to_image", "recall_at_1", "t2i R@1"),
    ("text_to_image", "recall_at_5", "t2i R@5"),
    ("text_to_image", "recall_at_10", "t2i R@10"),
    ("text_to_image", "median_rank", "t2i med. rank"),
    ("text_to_image", "mean_average_precision", "t2i mAP"),
    ("image_to_text", "recall_at_1", "i2t R@1"),
    ("image_to_text", "recall_at_10", "i2t R@10"),
    ("image_to_image", "recall_at_1", "i2i R@1"),
    ("image_to_image", "mean_average_precision", "i2i mAP"),
]


def _figure(metrics: dict, task: str, key: str) -> str:
    value = metrics.get(task, {}).get(key)
    return NOT_MEASURED if value is None else (f"{value:.0f}" if key.endswith("median_rank") else f"{value:.3f}")


NOT_MEASURED = "not measured"
_TASK_NAMES = {"text_to_image": "text->image", "image_to_text": "image->text", "image_to_image": "image->image"}


def sample_note(result: dict) -> str:
    """The cut of the manifest, as a warning line; "" when every row with a caption was compared."""
    sample = result.get("sample")
    return f"warning: {Sample(**sample).describe()}" if sample else ""


def unmeasured_notes(result: dict) -> list[str]:
    """One line per task and reason that some pooling could not be measured on, naming the poolings."""
    by_reason: dict[tuple[str, str], list[str]] = {}
    for row in result["poolings"]:
        for task, reason in row.get("not_measured", {}).items():
            by_reason.setdefault((task, reason), []).append(row["pooling"])
    return [
        f"{_TASK_NAMES[task]} {NOT_MEASURED}: {reason} ({', '.join(poolings)})"
        for (task, reason), poolings in by_reason.items()
    ]


def markdown_table(result: dict) -> str:
    """One row per pooling, and a last row with what a random ranking earns on the same queries."""
    lines = [
        "| pooling | dim | "
        + " | ".join(c[2] for c in _COLUMNS)
        + " | encode ms/item | build s | search p50 ms | p99 ms | bytes/vector |",
        "|" + "---|" * (len(_COLUMNS) + 7),
    ]
    for row in result["poolings"]:
        figures = " | ".join(_figure(row["metrics"], task, key) for task, key, _ in _COLUMNS)
        lines.append(
            f"| {row['pooling']} | {row['dim']} | {figures} | "
            f"{row['encode_ms_per_item']:.2f} | {row['index_build_seconds']:.2f} | {row['search_p50_ms']:.2f} | "
            f"{row['search_p99_ms']:.2f} | {row['bytes_per_vector']:.0f} |"
        )
    chance: dict[
        str, dict
    ] = {}  # relevance is the same for every pooling: take each task's chance from any row that has it
    for row in result["poolings"]:
        for task, values in row["metrics"].items():
            chance.setdefault(task, {k[len("chance_") :]: v for k, v in values.items() if k.startswith("chance_")})
    lines.append(
        "| chance (random ranking) | - | "
        + " | ".join(_figure(chance, task, key) for task, key, _ in _COLUMNS)
        + " | - | - | - | - | - |"
    )
    return "\n".join(lines)


def relevance_note(result: dict) -> str:
    """How relevance was defined, with a warning when captions repeat (results.md and the CLI print it)."""
    r = result["relevance"]
    counts = f"{r['items']} images, {r['distinct_captions']} distinct captions"
    if r["classes"] is not None:
        counts += f", {r['classes']} classes"
    note = f"Relevance {r['description']} ({counts})."
    if r["distinct_captions"] < r["items"]:
        note = (
            f"warning: captions repeat ({r['items'] - r['distinct_captions']} of {r['items']} images share a "
            f"caption with another); identical captions are one text. " + note
        )
    return note


def _write(job: CompareJob, result: dict) -> None:
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown_table(result)
    skipped = (
        f"\n{len(result['skipped'])} manifest rows skipped (listed in results.json).\n" if result["skipped"] else ""
    )
    cut = f"\n{sample_note(result)}\n" if result.get("sample") else ""
    unmeasured = "".join(f"\n- {note}" for note in unmeasured_notes(result))
    (out / "results.md").write_text(
        f"# Pooling comparison: {result['model']} on {result['data']} "
        f"({result['size']} pairs, index {result['index']}, {result['device']})\n\n"
        f"{relevance_note(result)}\n{cut}{skipped}\n{table}\n{unmeasured}\n"
    )
    _plots(result, out)


def _plots(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["pooling"] for r in result["poolings"]]
    tasks = [("text_to_image", "text->image"), ("image_to_text", "image->text"), ("image_to_image", "image->image")]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.27
    for k, (task, label) in enumerate(tasks):  # an unmeasured task draws no bar (NaN), not a bar of height 0
        values = [r["metrics"].get(task, {}).get("recall_at_1", np.nan) for r in result["poolings"]]
        ax.bar(np.arange(len(names)) + (k - 1) * width, values, width, label=label)
    ax.set_xticks(np.arange(len(names)), names, rotation=20)
    ax.set_ylabel("recall@1")
    ax.set_ylim(0, 1)
    ax.set_title(f"Recall@1 per pooling ({result['model']}, {result['size']} pairs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "recall_per_pooling.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for marker, (task, label) in zip("o^", (tasks[0], tasks[2])):
        xs = [r["bytes_per_vector"] for r in result["poolings"] if task in r["metrics"]]
        ys = [r["metrics"][task]["recall_at_1"] for r in result["poolings"] if task in r["metrics"]]
        ax.scatter(xs, ys, marker=marker, s=45, label=label)
    for k, r in enumerate(result["poolings"]):
        task = "text_to_image" if "text_to_image" in r["metrics"] else "image_to_image"
        if task not in r["metrics"]:
            continue  # nothing measured: no point to label
        y = r["metrics"][task]["recall_at_1"]
        ax.annotate(
            r["pooling"],
            (r["bytes_per_vector"], y),
            textcoords="offset points",
            xytext=(6, 10 * (k % 3) - 8),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlabel("bytes per vector (serialised index / items)")
    ax.set_ylabel("recall@1")
    ax.set_ylim(-0.02, 1)
    ax.set_title("Recall@1 against memory per vector")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "recall_vs_bytes.png", dpi=110)
    plt.close(fig)
