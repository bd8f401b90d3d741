"""Models shipped inside the package (see README, "The bundled model"): registered at import."""

from __future__ import annotations

from pathlib import Path

from embedsvc.models.registry import ModelSpec, register_model

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "models"
TINY_SCENES = "embedsvc-tiny-scenes"


def register_bundled() -> None:
    checkpoint = ASSETS / f"{TINY_SCENES}.safetensors"
    if checkpoint.is_file():
        register_model(ModelSpec(
            name=TINY_SCENES, architecture=TINY_SCENES, checkpoint=str(checkpoint),
            config_file=str(ASSETS / f"{TINY_SCENES}.json"),
            description="tiny ViT CLIP trained on embedsvc's generated scenes (shapes, colours, sizes, places)"))
