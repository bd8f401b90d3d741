"""Atomic files: write to a temporary name, fsync, rename over the target, fsync the folder.

A reader sees the old file or the new one, never a torn mix, whatever instant the process dies.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path
from typing import Optional

import numpy as np

TMP_MARK = ".tmp-"


def atomic_write(path: Path, data: bytes) -> None:
    """Each call writes its own temporary file, so concurrent writers never collide on one name."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def is_temporary(path: Path) -> bool:
    """A leftover of an atomic write that never reached its rename (the process died mid-write)."""
    return path.name.startswith(".") and TMP_MARK in path.name


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(path: Path, header: dict, arrays: dict[str, np.ndarray]) -> None:
    """One .npz file: the JSON header (log position, index kind...) and the arrays, written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
    atomic_write(path, buffer.getvalue())


def read_checkpoint(path: Path) -> Optional[tuple[dict, dict[str, np.ndarray]]]:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(bytes(data["header"]).decode())
        arrays = {k: data[k] for k in data.files if k != "header"}
    return header, arrays
