"""`embedsvc compare` on a class-like manifest (many images per caption): every figure equals a plain numpy
computation from `embedsvc embed` vectors; unusable rows are skipped and reported; a trained checkpoint
can be compared from the CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from cli_runner import run_cli

from embedsvc.models import DEFAULT_MODEL

CLASSES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star")]
PER_CLASS = 10
POOLINGS = ["cls", "avg", "max", "gem:p=3", "netvlad:clusters=4", "spp"]


@pytest.fixture(scope="module")
def class_manifest(tmp_path_factory):
    """40 rendered single shapes, 10 per caption, with a label column; plus a missing and a corrupt file."""
    from embedsvc.datasets import POSITIONS, SIZES, Scene, SceneObject, render_scene

    folder = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    rows = []
    for label, (colour, shape) in enumerate(CLASSES):
        for k in range(PER_CLASS):
            obj = SceneObject(shape, colour, SIZES[k % 2], POSITIONS[int(rng.integers(len(POSITIONS)))])
            scene = Scene(f"c{label}-{k}", "test", k, (obj,), (128, 128, 128))
            render_scene(scene, 72).save(folder / f"{scene.id}.png")
            rows.append({"id": scene.id, "path": f"{scene.id}.png", "caption": f"a {colour} {shape}", "label": label})
    good = list(rows)
    (folder / "corrupt.png").write_bytes(b"\x89PNG not really")
    rows += [
        {"id": "gone", "path": "missing.png", "caption": "a red circle", "label": 0},
        {"id": "bad", "path": "corrupt.png", "caption": "a red circle", "label": 0},
    ]
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "path", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest, good


def _numpy_metrics(queries: np.ndarray, items: np.ndarray, relevant: np.ndarray, exclude_self: bool = False) -> dict:
    """Plain reference: rank = 1 + number of items scoring higher than the relevant one."""
    sim = queries @ items.T
    first, aps = [], []
    for q in range(len(sim)):
        scores = sim[q].copy()
        if exclude_self:
            scores[q] = -np.inf
        rel = np.flatnonzero(relevant[q])
        ranks = np.sort([1 + np.sum(scores > scores[j]) for j in rel])
        first.append(ranks[0])
        aps.append(np.mean([(i + 1) / r for i, r in enumerate(ranks)]))
    first = np.array(first)
    return {
        "recall_at_1": np.mean(first <= 1),
        "recall_at_5": np.mean(first <= 5),
        "recall_at_10": np.mean(first <= 10),
        "median_rank": np.median(first),
        "mean_average_precision": np.mean(aps),
    }


def test_compare_figures_equal_numpy_from_embed_vectors_and_bad_rows_are_skipped(class_manifest, tmp_path):
    manifest, good = class_manifest
    out = tmp_path / "cmp"
    pooling_args = [a for p in POOLINGS for a in ("--pooling", p)]
    proc = run_cli("compare", "--data", str(manifest), "--out-dir", str(out), *pooling_args)
    assert proc.returncode == 0, proc.stderr
    assert "missing.png: file not found" in proc.stderr and "corrupt.png" in proc.stderr
    assert "skipped 2 manifest rows" in proc.stderr
    assert "warning: captions repeat" in proc.stderr and "'label' column" in proc.stderr
    result = json.loads((out / "results.json").read_text())
    assert result["size"] == len(good) and len(result["skipped"]) == 2
    assert result["relevance"]["definition"] == "label" and result["relevance"]["distinct_captions"] == 4
    assert "chance (random ranking)" in (out / "results.md").read_text()
    rows = {r["pooling"]: r for r in result["poolings"]}

    labels = np.array([r["label"] for r in good])
    captions = sorted({r["caption"] for r in good}, key=[r["caption"] for r in good].index)
    caption_label = np.array([next(r["label"] for r in good if r["caption"] == c) for c in captions])
    args = [a for r in good for a in ("--image", str(manifest.parent / r["path"]))]
    args += [a for c in captions for a in ("--text", c)]
    state = out / "state-netvlad-clusters=4.safetensors"  # the codebook compare fitted, reused by embed
    embedded = run_cli("embed", "--model", DEFAULT_MODEL, *pooling_args, "--pooling-state", str(state), *args, "--json")
    assert embedded.returncode == 0, embedded.stderr
    results = json.loads(embedded.stdout)["results"]
    for number, pooling in enumerate(POOLINGS):
        vectors = np.array([list(r["embeddings"].values())[number] for r in results])
        images, texts = vectors[: len(good)], vectors[len(good) :]
        t2i_rel = caption_label[:, None] == labels[None, :]
        expected = {
            "text_to_image": _numpy_metrics(texts, images, t2i_rel),
            "image_to_text": _numpy_metrics(images, texts, t2i_rel.T),
            "image_to_image": _numpy_metrics(
                images,
                images,
                (labels[:, None] == labels[None, :]) & ~np.eye(len(labels), dtype=bool),
                exclude_self=True,
            ),
        }
        measured = rows[pooling]["metrics"]
        for task, figures in expected.items():
            for key, value in figures.items():
                assert measured[task][key] == pytest.approx(value, abs=0.01), (pooling, task, key)
        assert measured["text_to_image"]["relevant_per_query"] == PER_CLASS
        assert measured["text_to_image"]["chance_recall_at_1"] == pytest.approx(0.25)


def test_compare_without_label_column_uses_identical_captions(class_manifest, tmp_path):
    manifest, good = class_manifest
    proc = run_cli(
        "compare", "--data", str(manifest), "--label-column", "", "--out-dir", str(tmp_path), "--pooling", "cls"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["relevance"]["definition"] == "caption"
    cls = result["poolings"][0]["metrics"]
    assert cls["text_to_image"]["queries"] == 4 and cls["image_to_text"]["candidates"] == 4
    assert "image_to_image" not in cls  # no labels and no scene keys: not measured


def test_compare_with_nothing_usable_is_one_line_and_exit_2(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,caption\nnope.png,a red circle\n")
    proc = run_cli("compare", "--data", str(manifest), "--out-dir", str(tmp_path / "o"), "--pooling", "cls")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no usable image-caption pairs" in proc.stderr and "nope.png" in proc.stderr


def test_a_seed_the_scenes_data_cannot_use_is_refused_not_ignored(tmp_path):
    """`--seed` was silently ignored with the scenes data (its pairs are the first --size test scenes)."""
    proc = run_cli("compare", "--seed", "5", "--size", "4", "--out-dir", str(tmp_path / "o"), "--pooling", "cls")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--seed 5" in proc.stderr and "leave --seed out" in proc.stderr and not (tmp_path / "o").exists()


def test_an_extreme_aspect_ratio_is_skipped_offline_as_the_server_refuses_it(tmp_path):
    """A 40000x1 strip resized to the model's 72-pixel input would be 2,880,000x72 pixels: compare and
    train's data skip it by path, before any resize allocates it."""
    from PIL import Image

    from embedsvc.jobs.compare import CompareJob, run_compare
    from embedsvc.models import DEFAULT_MODEL, get_model_spec, load_model
    from embedsvc.training.data import manifest_pairs, read_manifest_images

    Image.new("RGB", (40_000, 1), (200, 30, 30)).save(tmp_path / "strip.png")
    for k in range(3):
        Image.new("RGB", (64, 64), (40 * k, 200, 90)).save(tmp_path / f"ok{k}.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "path,caption\nstrip.png,a red strip\n" + "".join(f"ok{k}.png,a green square {k}\n" for k in range(3))
    )
    result = run_compare(
        CompareJob(data=str(manifest), poolings=("cls",), out_dir=str(tmp_path / "o"), latency_queries=2)
    )
    assert result["size"] == 3 and [s["path"] for s in result["skipped"]] == [str(tmp_path / "strip.png")]
    assert "2,880,000x72" in result["skipped"][0]["reason"]
    loaded = load_model(get_model_spec(DEFAULT_MODEL))
    pairs = manifest_pairs(read_manifest_images(str(manifest)), loaded.preprocess, loaded.tokenizer, 72)
    assert len(pairs) == 3 and pairs.skipped[0][0].endswith("strip.png") and "crop it" in pairs.skipped[0][1]


def _manifest(folder, images, rows: list[dict]):
    """A manifest in `folder` of `rows` whose paths are relative to `images`."""
    manifest = folder / "rows.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(dict(r, path=str(images / r["path"])) for r in rows)
    return manifest


def test_a_cut_is_a_seeded_random_sample_announced_with_its_counts(class_manifest, tmp_path):
    """The manifest is ordered by class (a vendor's rows together): its first 10 rows are one class. --size 10
    draws 10 usable rows at random (seeded: the same 10 again), so several classes are compared, and says so."""
    manifest, good = class_manifest
    runs = []
    for out in (tmp_path / "a", tmp_path / "b"):
        proc = run_cli("compare", "--data", str(manifest), "--size", "10", "--out-dir", str(out), "--pooling", "cls")
        assert proc.returncode == 0, proc.stderr
        runs.append((proc, json.loads((out / "results.json").read_text()), (out / "results.md").read_text()))
    (proc, result, report), (_, again, _) = runs
    assert result["size"] == 10 and result["relevance"]["classes"] >= 3  # the first 10 rows hold one class
    sample = result["sample"]
    assert sample == again["sample"] and sample["ids"] == again["sample"]["ids"]
    assert sample["used"] == 10 and sample["rows"] == len(good) + 2 and sample["seed"] == 0
    assert len({i.split("-")[0] for i in sample["ids"]}) >= 3 and set(sample["ids"]) <= {r["id"] for r in good}
    announced = f"a random sample of 10 of the {len(good) + 2} manifest rows with a caption"
    assert announced in proc.stderr and "warning" in proc.stderr and announced in report
    assert "image_to_image" in result["poolings"][0]["metrics"]


def test_by_default_the_whole_manifest_is_compared(class_manifest, tmp_path):
    """1,010 rows (the 40 images, each listed many times under its own id): all of them, no cut, nothing said."""
    from embedsvc.jobs.compare import CompareJob, run_compare

    manifest, good = class_manifest
    rows = [dict(good[n % len(good)], id=f"row-{n}") for n in range(1010)]
    result = run_compare(
        CompareJob(
            data=str(_manifest(tmp_path, manifest.parent, rows)),
            poolings=("cls",),
            out_dir=str(tmp_path / "o"),
            latency_queries=2,
        )
    )
    assert result["size"] == 1010 and result["sample"] is None
    assert "sample" not in (tmp_path / "o" / "results.md").read_text()


def test_a_task_with_nothing_to_measure_is_not_measured_never_zero(class_manifest, tmp_path):
    """One image per label: no image has another relevant image, so image->image cannot be measured; it is absent
    from the JSON and says "not measured" (with why) in the table, the report and on stderr, never 0.000."""
    manifest, good = class_manifest
    rows = [dict(r, label=n) for n, r in enumerate(good[::5])]
    data = _manifest(tmp_path, manifest.parent, rows)
    proc = run_cli(
        "compare",
        "--data",
        str(data),
        "--out-dir",
        str(tmp_path / "o"),
        "--pooling",
        "cls",
        "--pooling",
        "spp:combine=concat",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "o" / "results.json").read_text())
    metrics = {r["pooling"]: r["metrics"] for r in result["poolings"]}
    assert "image_to_image" not in metrics["cls"] and metrics["spp:combine=concat"] == {}  # images only: no i2i
    assert metrics["cls"]["text_to_image"]["queries"] == len({r["caption"] for r in rows})
    report = (tmp_path / "o" / "results.md").read_text()
    for text in (proc.stdout, report):
        table = [line for line in text.splitlines() if line.startswith("| cls |")]
        assert len(table) == 1 and table[0].count("not measured") == 2, table  # i2i R@1, i2i mAP
    why = "image->image not measured: no image has another image of its label (cls, spp:combine=concat)"
    assert why in proc.stderr and why in report
    assert "text->image not measured: spp:combine=concat pools images only" in proc.stderr
