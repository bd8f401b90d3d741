"""Models shipped inside the package (see docs/models.md, "The bundled models"): registered at import.

Each is `assets/models/NAME.safetensors` (an open_clip state dict) with `NAME.json` (its architecture,
registered with open_clip under NAME) and its model card. A shipped model never changes its weights under
its name: collections bound to it must keep matching their stored vectors; a better one ships as a new name.
"""

from __future__ import annotations

from pathlib import Path

from embedsvc.models.registry import ModelSpec, register_model

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "models"
TINY_SCENES = "embedsvc-tiny-scenes"
TINY_SCENES_2 = "embedsvc-tiny-scenes-2"
# The model of new collections, `serve`'s demo and the offline tools when none is named (ServerConfig's
# default_model and preload_models spell the same name: config imports no model code).
DEFAULT_MODEL = TINY_SCENES_2

BUNDLED = {
    TINY_SCENES: "tiny ViT CLIP trained on embedsvc's generated scenes (shapes, colours, sizes, places); v1: "
    "only cls retrieves across modalities",
    TINY_SCENES_2: "v1 trained on with augmented scenes, hard negative captions and patch-token losses: "
    "cls, avg, max, gem, netvlad and spp retrieve across modalities (final tokens)",
}


def register_bundled() -> None:
    for name, description in BUNDLED.items():
        checkpoint = ASSETS / f"{name}.safetensors"
        if checkpoint.is_file():
            register_model(
                ModelSpec(
                    name=name,
                    architecture=name,
                    checkpoint=str(checkpoint),
                    config_file=str(ASSETS / f"{name}.json"),
                    description=description,
                )
            )
