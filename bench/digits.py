"""The digits flow from the CLI alone: scikit-learn's 1,797 handwritten digits as a captioned manifest
("a handwritten digit seven", a `label` column), `embedsvc train` of a small CLIP, then `embedsvc compare`
of the trained checkpoint and of the bundled model on the held-out rows, side by side with chance levels.

    python bench/digits.py [--out digits-out] [--steps 300] [--batch-size 64] [--threads 0]

Needs scikit-learn (the dev extra); load_digits ships inside it, nothing is downloaded.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from embedsvc.models import DEFAULT_MODEL

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# A small ViT CLIP for 32 px digits: 4x4 patches of 8 px, 64-d joint space, short text context.
MODEL = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 96, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_manifests(out: Path, every: int = 5) -> tuple[Path, Path]:
    """PNG per digit (8x8 scaled to 32x32, grey on RGB) and two manifests: every `every`-th row held out."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"train": [], "heldout": []}
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        path = f"images/digit-{i:04d}.png"
        grey = Image.fromarray((pixels * (255 / 16)).astype("uint8"), "L").resize((32, 32), Image.Resampling.BICUBIC)
        grey.convert("RGB").save(out / path)
        rows["heldout" if i % every == 0 else "train"].append(
            {
                "id": f"digit-{i:04d}",
                "path": path,
                "caption": f"a handwritten digit {NAMES[label]}",
                "label": int(label),
            }
        )
    paths = []
    for split, items in rows.items():
        paths.append(out / f"{split}.csv")
        with open(paths[-1], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "path", "caption", "label"])
            writer.writeheader()
            writer.writerows(items)
    return paths[0], paths[1]


def cli(*args: str) -> None:
    print("$ embedsvc " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "embedsvc", *args], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="digits-out")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for training (0: all cores)")
    args = parser.parse_args()
    out = Path(args.out)
    train, heldout = write_manifests(out)
    config = out / "digits-clip.json"
    config.write_text(json.dumps(MODEL, indent=2) + "\n")
    started = time.perf_counter()
    cli(
        "train",
        "--config",
        str(config),
        "--data",
        str(train),
        "--eval-data",
        str(heldout),
        "--eval-size",
        "1000",
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        "0.001",
        "--warmup-steps",
        "30",
        "--threads",
        str(args.threads),
        "--out-dir",
        str(out / "model"),
    )
    train_minutes = (time.perf_counter() - started) / 60
    poolings = [a for p in ("cls", "avg", "gem:p=3") for a in ("--pooling", p)]
    cli(
        "compare",
        "--checkpoint",
        str(out / "model" / "digits-clip.safetensors"),
        "--data",
        str(heldout),
        *poolings,
        "--out-dir",
        str(out / "compare-trained"),
    )
    cli("compare", "--data", str(heldout), *poolings, "--out-dir", str(out / "compare-bundled"))

    print(f"\ntraining: {args.steps} steps x {args.batch_size}, {train_minutes:.1f} min (data preparation included)")
    print("\n| model | pooling | t2i R@1 | t2i mAP | i2t R@1 (= zero-shot accuracy) | i2i R@1 | i2i mAP |")
    print("|---|---|---|---|---|---|---|")
    chance: dict = {}
    for model, folder in (
        ("trained (digits-clip)", "compare-trained"),
        (f"bundled {DEFAULT_MODEL}", "compare-bundled"),
    ):
        result = json.loads((out / folder / "results.json").read_text())
        for row in result["poolings"]:
            m = row["metrics"]
            print(
                f"| {model} | {row['pooling']} | {m['text_to_image']['recall_at_1']:.3f} | "
                f"{m['text_to_image']['mean_average_precision']:.3f} | {m['image_to_text']['recall_at_1']:.3f} | "
                f"{m['image_to_image']['recall_at_1']:.3f} | {m['image_to_image']['mean_average_precision']:.3f} |"
            )
            chance = m
    print(
        f"| chance (random ranking) | - | {chance['text_to_image']['chance_recall_at_1']:.3f} | "
        f"{chance['text_to_image']['chance_mean_average_precision']:.3f} | "
        f"{chance['image_to_text']['chance_recall_at_1']:.3f} | {chance['image_to_image']['chance_recall_at_1']:.3f} | "
        f"{chance['image_to_image']['chance_mean_average_precision']:.3f} |"
    )
    print(f"\nheld out: {result['size']} digits, {result['relevance']['description']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
