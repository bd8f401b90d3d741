"""The model's image transform cut where pixels become floats: geometry per image, normalisation per batch.

open_clip's validation transform is `Compose([Resize, CenterCrop, MaybeConvertMode, MaybeToTensor,
Normalize])`. Run per image, its last two steps turn a few thousand bytes into floats and normalise them
one image at a time (about a third of the transform's time at 72 px, a fifth of a 72 px PNG's decode plus
transform). Cut before `MaybeToTensor`, a decode worker does the PIL steps and keeps the result as a uint8
[3, H, W] tensor (a view of the PIL buffer's bytes, copied once); the model thread normalises the stacked
batch in one operation, on the model's device (a quarter of the bytes to copy to a GPU). The result equals
the whole transform's to float rounding (tests/test_preprocess.py): `to_tensor` divides by 255 and
`Normalize` subtracts and divides, the same operations in the same order.

A transform of another shape (a user's own, extra steps after the tensor) is not cut: `split_transform`
returns None and callers run the whole transform per image.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True, eq=False)
class SplitTransform:
    # The PIL steps before the tensor conversion (resize, crop, mode), in order.
    geometry: tuple[Callable[[Image.Image], Image.Image], ...]
    # Normalize's per-channel mean and std.
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """[3, H, W] uint8 after the geometry (an image still not RGB then, under a transform without a mode
        step, is converted: the model takes three channels)."""
        for step in self.geometry:
            image = step(image)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A stacked uint8 [B, 3, H, W] batch as the model's float input on `device`."""
        x = pixels.to(device, non_blocking=True).float().div_(255)
        mean, std = self._constants(x.device)
        return x.sub_(mean).div_(std).to(dtype)

    @functools.lru_cache(maxsize=4)  # noqa: B019 - 4 entries, of a preprocessor that lives as long as its model
    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std as [1, 3, 1, 1] tensors on `device`, made once per device."""
        return (
            torch.tensor(self.mean, device=device).view(1, -1, 1, 1),
            torch.tensor(self.std, device=device).view(1, -1, 1, 1),
        )


def split_transform(preprocess) -> SplitTransform | None:
    """The cut of a torchvision Compose that ends `..., ToTensor, Normalize`; None for any other shape."""
    from torchvision import transforms as T

    steps = list(getattr(preprocess, "transforms", ()))
    if (
        len(steps) < 2
        or not isinstance(steps[-1], T.Normalize)
        or type(steps[-2]).__name__ not in ("ToTensor", "MaybeToTensor")
    ):
        return None
    normalize = steps[-1]
    if normalize.inplace is not False or any(
        type(s).__name__ in ("ToTensor", "MaybeToTensor", "Normalize") for s in steps[:-2]
    ):
        return None
    return SplitTransform(
        tuple(steps[:-2]), tuple(float(m) for m in normalize.mean), tuple(float(s) for s in normalize.std)
    )
