"""Data sets embedsvc can generate itself: procedurally drawn, captioned scenes."""

from embedsvc.datasets.scenes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    full_caption,
    generate_scene,
    render_scene,
    scene_captions,
    scenes,
    write_scenes,
)

__all__ = [
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Scene",
    "SceneObject",
    "full_caption",
    "generate_scene",
    "render_scene",
    "scene_captions",
    "scenes",
    "write_scenes",
]
