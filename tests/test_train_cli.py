"""`embedsvc train` on a user-style manifest, end to end, and its output served by `embedsvc embed`."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np

from embedsvc.datasets import write_scenes

from conftest import TINY_VIT_CONFIG


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embedsvc", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


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
    proc = run_cli("train", "--config", str(config), "--data", str(manifest), "--steps", "4", "--batch-size", "32",
                   "--warmup-steps", "1", "--eval-size", "40", "--out-dir", str(out), "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "images/corrupt.png" in proc.stderr and "could not decode" in proc.stderr
    assert "images/missing.png: file not found" in proc.stderr
    assert "step 4/4" in proc.stderr and "pairs/s" in proc.stderr
    card = json.loads((out / "model_card.json").read_text())
    assert card["held_out"]["text_to_image"]["queries"] == 40
    assert "200 training pairs, 40 held out, 2 rows skipped" in card["data"]

    embedded = run_cli("embed", "--model", "mini-clip", "--checkpoint", str(out / "mini-clip.safetensors"),
                       "--model-config", str(out / "mini-clip.json"), "--text", "a small red circle",
                       "--image", str(data / "images" / "train-0000000.png"), "--json")
    assert embedded.returncode == 0, embedded.stderr
    rows = json.loads(embedded.stdout)["results"]
    assert [len(r["embeddings"]["cls"]) for r in rows] == [32, 32]
    assert np.isclose(np.linalg.norm(rows[0]["embeddings"]["cls"]), 1.0, atol=1e-5)


def test_empty_manifest_is_a_clear_error(tmp_path):
    manifest = tmp_path / "empty.csv"
    manifest.write_text("id,path,caption\n")
    proc = run_cli("train", "--architecture", "ViT-B-32", "--data", str(manifest), "--steps", "1",
                   "--out-dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "has no rows" in proc.stderr and "Traceback" not in proc.stderr


def test_manifest_without_usable_rows(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "nowhere.png", "caption": "x"}) + "\n")
    proc = run_cli("train", "--architecture", "ViT-B-32", "--data", str(manifest), "--steps", "1",
                   "--out-dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "no usable image-caption pairs" in proc.stderr
