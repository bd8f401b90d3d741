"""`embedsvc train` on a user-style manifest, end to end, and its output served by `embedsvc embed`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from cli_runner import run_cli
from conftest import TINY_VIT_CONFIG

from embedsvc.datasets import write_scenes


@pytest.mark.slow  # trains (about a minute on 2 cores)
def test_train_on_manifest_then_embed(tmp_path):
    data = tmp_path / "data"
    manifest = write_scenes(data, "train", 240, size=32)
    (data / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with open(manifest, "a", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["bad-1", "images/corrupt.png", "a red circle", "", "", 1])
        writer.writerow(["bad-2", "images/missing.png", "a blue star", "", "", 1])
    config = tmp_path / "mini-clip.json"
    config.write_text(json.dumps(TINY_VIT_CONFIG))
    out = tmp_path / "out"
    proc = run_cli(
        "train",
        "--config",
        str(config),
        "--data",
        str(manifest),
        "--steps",
        "4",
        "--batch-size",
        "32",
        "--warmup-steps",
        "1",
        "--eval-size",
        "40",
        "--out-dir",
        str(out),
        "--seed",
        "3",
    )
    assert proc.returncode == 0, proc.stderr
    assert "images/corrupt.png" in proc.stderr and "could not decode" in proc.stderr
    assert "images/missing.png: file not found" in proc.stderr
    assert "step 4/4" in proc.stderr and "pairs/s" in proc.stderr
    card = json.loads((out / "model_card.json").read_text())
    assert card["held_out"]["text_to_image"]["queries"] == 40
    assert "200 training pairs, 40 held out, 2 rows skipped" in card["data"]

    embedded = run_cli(
        "embed",
        "--model",
        "mini-clip",
        "--checkpoint",
        str(out / "mini-clip.safetensors"),
        "--model-config",
        str(out / "mini-clip.json"),
        "--text",
        "a small red circle",
        "--image",
        str(data / "images" / "train-0000000.png"),
        "--json",
    )
    assert embedded.returncode == 0, embedded.stderr
    rows = json.loads(embedded.stdout)["results"]
    assert [len(r["embeddings"]["cls"]) for r in rows] == [32, 32]
    assert np.isclose(np.linalg.norm(rows[0]["embeddings"]["cls"]), 1.0, atol=1e-5)


def test_empty_manifest_is_a_clear_error(tmp_path):
    manifest = tmp_path / "empty.csv"
    manifest.write_text("id,path,caption\n")
    proc = run_cli(
        "train", "--architecture", "ViT-B-32", "--data", str(manifest), "--steps", "1", "--out-dir", str(tmp_path / "o")
    )
    assert proc.returncode == 2 and "has no rows" in proc.stderr and "Traceback" not in proc.stderr


def test_manifest_without_usable_rows(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "nowhere.png", "caption": "x"}) + "\n")
    proc = run_cli(
        "train", "--architecture", "ViT-B-32", "--data", str(manifest), "--steps", "1", "--out-dir", str(tmp_path / "o")
    )
    assert proc.returncode == 2 and "no usable image-caption pairs" in proc.stderr


@pytest.mark.slow  # trains twice, compares and indexes (over a minute)
def test_trained_checkpoint_is_evaluated_continued_compared_and_indexed_from_the_cli(tmp_path):
    """--eval-data holds out a separate manifest; --init continues from the result; compare and index take
    --checkpoint (the model name and config default to the files `train` wrote)."""
    data = tmp_path / "data"
    train_manifest = write_scenes(data, "train", 64, size=32)
    eval_manifest = write_scenes(tmp_path / "eval", "test", 24, size=32)
    config = tmp_path / "mini-clip.json"
    config.write_text(json.dumps(TINY_VIT_CONFIG))
    first = tmp_path / "first"
    common = ["--steps", "2", "--batch-size", "16", "--warmup-steps", "1", "--eval-size", "20"]
    proc = run_cli(
        "train",
        "--config",
        str(config),
        "--data",
        str(train_manifest),
        "--eval-data",
        str(eval_manifest),
        *common,
        "--out-dir",
        str(first),
    )
    assert proc.returncode == 0, proc.stderr
    card = json.loads((first / "model_card.json").read_text())
    assert "64 training pairs; held out: the first 20 usable rows" in card["data"]
    t2i = card["held_out"]["text_to_image"]
    assert t2i["candidates"] == 20 and 0 < t2i["chance_recall_at_1"] <= 1 / 20 + 1e-9
    assert "(chance" in proc.stdout

    second = tmp_path / "second"
    proc = run_cli(
        "train",
        "--checkpoint",
        str(first / "mini-clip.safetensors"),
        "--data",
        str(train_manifest),
        *common,
        "--out-dir",
        str(second),
        "--name",
        "mini-clip-2",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((second / "mini-clip-2.json").read_text()) == json.loads((first / "mini-clip.json").read_text())

    checkpoint = str(second / "mini-clip-2.safetensors")
    proc = run_cli(
        "compare",
        "--checkpoint",
        checkpoint,
        "--data",
        str(eval_manifest),
        "--pooling",
        "cls",
        "--out-dir",
        str(tmp_path / "cmp"),
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert result["model"] == "mini-clip-2" and result["poolings"][0]["dim"] == 32
    proc = run_cli(
        "index",
        str(eval_manifest),
        "--collection",
        "mini=cls",
        "--local",
        str(tmp_path / "store"),
        "--checkpoint",
        checkpoint,
        "--report",
        str(tmp_path / "report.jsonl"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "indexed 24" in proc.stdout
    proc = run_cli("index", str(eval_manifest), "--collection", "mini=cls", "--checkpoint", checkpoint)
    assert proc.returncode == 2 and "add --local DATA_DIR" in proc.stderr and "Traceback" not in proc.stderr


def test_the_card_says_not_measured_for_a_task_with_no_query(tmp_path):
    """Held-out rows of distinct labels: no image has another of its label, so image->image has nothing to measure.
    The card says "not measured" and the JSON leaves the task out; neither shows 0.000 as if measured."""
    import torch

    from embedsvc.eval import cross_modal_metrics, not_measured
    from embedsvc.training.train import TrainConfig, _write_card

    vectors = np.eye(4)
    metrics = {
        k: v.as_dict()
        for k, v in cross_modal_metrics(vectors, vectors, captions=list("abcd"), labels=[0, 1, 2, 3]).items()
    }
    checkpoint = tmp_path / "m.safetensors"
    checkpoint.write_bytes(b"weights")
    card = _write_card(
        tmp_path,
        "m",
        TrainConfig(data="m.csv"),
        "manifest m.csv",
        metrics,
        [],
        1.0,
        60.0,
        torch.device("cpu"),
        checkpoint,
        not_measured(metrics, labels=True, image_keys=False),
    )
    rows = {line.split("|")[1].strip(): line for line in card.read_text().splitlines() if line.startswith("| ")}
    assert "1.000 (0.250)" in rows["text_to_image"]
    assert "not measured" in rows["image_to_image"] and "0.000" not in rows["image_to_image"]
    assert "no image has another image of its label" in rows["image_to_image"]
    written = json.loads((tmp_path / "model_card.json").read_text())
    assert set(written["held_out"]) == {"text_to_image", "image_to_text"}
    assert "its label" in written["not_measured"]["image_to_image"]
