"""`embedsvc embed` as a user runs it (tests/cli_runner.py): real checkpoints, JSON compared to open_clip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_runner import run_cli
from conftest import png_bytes


@pytest.mark.parametrize("fixture", ["tiny_spec", "tiny_rn_spec"])  # a ViT and a ModifiedResNet tower
def test_embed_json_cls_equals_open_clip(fixture, request, tmp_path):
    """The CLI path (checkpoint + model config, as `embedsvc train` writes them); the parity on ViT-B-32
    and RN50 themselves is tests/test_encoder_native.py's."""
    import open_clip

    spec = request.getfixturevalue(fixture)
    arch, checkpoint = spec.architecture, spec.checkpoint
    image_path = tmp_path / "scene.png"
    image_path.write_bytes(png_bytes(size=(120, 90)))
    proc = run_cli(
        "embed",
        "--model",
        arch,
        "--checkpoint",
        str(checkpoint),
        "--model-config",
        spec.config_file,
        "--pooling",
        "cls",
        "--pooling",
        "avg",
        "--text",
        "a small red circle",
        "--image",
        str(image_path),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [r["modality"] for r in out["results"]] == ["text", "image"]

    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(checkpoint))
    model.eval()
    from PIL import Image

    with torch.no_grad():
        text_ref = F.normalize(model.encode_text(open_clip.get_tokenizer(arch)(["a small red circle"])), dim=-1)[0]
        image_ref = F.normalize(model.encode_image(preprocess(Image.open(image_path).convert("RGB"))[None]), dim=-1)[0]
    text_cls = np.array(out["results"][0]["embeddings"]["cls"], dtype=np.float32)
    image_cls = np.array(out["results"][1]["embeddings"]["cls"], dtype=np.float32)
    assert np.abs(text_cls - text_ref.numpy()).max() < 1e-5
    assert np.abs(image_cls - image_ref.numpy()).max() < 1e-5
    assert len(out["results"][1]["embeddings"]["avg"]) == model.visual.output_dim


def test_embed_tokens_json(tiny_spec, tmp_path):
    image_path = tmp_path / "scene.webp"
    image_path.write_bytes(png_bytes(fmt="WEBP"))
    proc = run_cli(
        "embed",
        "--model",
        tiny_spec.architecture,
        "--checkpoint",
        tiny_spec.checkpoint,
        "--model-config",
        tiny_spec.config_file,
        "--text",
        "hi there",
        "--image",
        str(image_path),
        "--pooling",
        "max",
        "--json",
        "--tokens",
    )
    assert proc.returncode == 0, proc.stderr
    text, image = json.loads(proc.stdout)["results"]
    assert np.array(text["tokens"]).shape == (4, 32)  # SOT, hi, there, EOT in the 32-d joint space
    assert np.array(image["tokens"]).shape == (16, 32) and image["grid"] == [4, 4]  # 32 px in 8 px patches
    tokens = np.array(image["tokens"], dtype=np.float32)
    expected = tokens.max(0) / np.linalg.norm(tokens.max(0))
    assert np.abs(np.array(image["embeddings"]["max"]) - expected).max() < 1e-5


def test_embed_json_keeps_two_specs_of_one_pooling_apart(tiny_encoder, tiny_spec, capsys):
    """Issue 22 item 11: the JSON keyed vectors by pooling name, so gem:p=3 and gem:p=4 collided."""
    from embedsvc.cli import main
    from embedsvc.encoder import embed
    from embedsvc.pooling import bind_pooling

    specs = ["gem:p=3", "gem:p=4"]
    assert (
        main(
            [
                "embed",
                "--model",
                tiny_spec.architecture,
                "--checkpoint",
                tiny_spec.checkpoint,
                "--model-config",
                tiny_spec.config_file,
                "--pooling",
                specs[0],
                "--pooling",
                specs[1],
                "--text",
                "a red circle",
                "--json",
            ]
        )
        == 0
    )
    embeddings = json.loads(capsys.readouterr().out)["results"][0]["embeddings"]
    assert list(embeddings) == specs
    expected = embed(tiny_encoder, ["a red circle"], [bind_pooling(s) for s in specs]).vectors
    for j, spec in enumerate(specs):
        assert np.abs(np.array(embeddings[spec], dtype=np.float32) - expected[j][0]).max() < 1e-5
    assert np.abs(np.array(embeddings[specs[0]]) - np.array(embeddings[specs[1]])).max() > 1e-3


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--model", "ViT-B-32", "--random-init", "--pooling", "gem:p=3", "--pooling", "gem:p=3", "--text", "a"],
            "--pooling 'gem:p=3' is given twice",
        ),
        (["--model", "no-such-model", "--text", "x"], "unknown model 'no-such-model'"),
        (["--model", "ViT-B-32", "--checkpoint", "/nonexistent/w.pt", "--text", "x"], "does not exist"),
        (["--model", "ViT-B-32", "--random-init", "--text", "   "], "empty"),
        (["--model", "ViT-B-32", "--random-init", "--pooling", "spp:combine=concat", "--text", "a"], "combine=sum"),
        (["--model", "ViT-B-32", "--random-init", "--pooling", "netvlad", "--text", "a"], "no fitted codebook"),
        (["--model", "ViT-B-32", "--random-init", "--pooling", "bogus", "--text", "a"], "unknown pooling 'bogus'"),
        (["--model", "ViT-B-32", "--random-init", "--image", "/nonexistent.png"], "does not exist"),
        (["--model", "ViT-B-32", "--random-init"], "nothing to embed"),
    ],
)
def test_embed_errors_are_messages_not_tracebacks(args, message, capsys):
    """In-process through the CLI's own entry point (what a subprocess runs; test_embed_corrupt_image and
    tests/test_cli_flows.py run it as a process)."""
    from embedsvc.cli import main

    assert main(["embed", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and err.startswith("embedsvc embed: error:"), err


def test_embed_corrupt_image(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    proc = run_cli("embed", "--model", "ViT-B-32", "--random-init", "--image", str(bad))
    assert proc.returncode == 2 and "could not decode image" in proc.stderr and "Traceback" not in proc.stderr
