"""Device and precision choice: CUDA when present, CPU otherwise; half precision only on GPU."""

from __future__ import annotations

import torch

from embedsvc.errors import InvalidInput, quoted

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda:0 when CUDA is usable, else cpu; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidInput(f"unknown device {quoted(name)}: use 'auto', 'cpu' or 'cuda[:N]'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput(f"device {quoted(name)} asked for, but CUDA is not available here: use 'auto' or 'cpu'")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """Returns an open_clip precision name. 'auto' is fp16 on GPU and fp32 on CPU, where half is slow."""
    if precision not in PRECISIONS:
        raise InvalidInput(f"unknown precision {quoted(precision)}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision in ("fp16", "bf16") and device.type != "cuda":
        raise InvalidInput(f"precision {precision} needs a GPU; on {device} use fp32 (or 'auto')")
    return precision


def torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
