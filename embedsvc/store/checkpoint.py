"""Atomic files: write to a temporary name, fsync, rename over the target, fsync the folder.

A reader sees the old file or the new one, never a torn mix, whatever instant the process dies.
Checkpoints are .npz files (one .npy member per array, a JSON header member); a FAISS index member is
streamed from the index into the file and back, a megabyte at a time, instead of being serialised into a
buffer, copied into an archive in memory and copied again on load.
"""

from __future__ import annotations

import json
import os
import uuid
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import numpy as np

TMP_MARK = ".tmp-"


def atomic_write(path: Path, data: bytes) -> None:
    """Each call writes its own temporary file, so concurrent writers never collide on one name."""
    with atomic_file(path) as f:
        f.write(data)


def is_temporary(path: Path) -> bool:
    """A leftover of an atomic write that never reached its rename (the process died mid-write)."""
    return path.name.startswith(".") and TMP_MARK in path.name


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


STREAM_BYTES = 1 << 20


@contextmanager
def atomic_file(path: Path):
    """A file object whose content replaces `path` atomically when the block ends without an exception."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def serialized_size(index) -> int:
    """Bytes faiss.serialize_index would give, counted without making them."""
    import faiss

    size = 0

    def count(data: bytes) -> int:
        nonlocal size
        size += len(data)
        return len(data)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count, STREAM_BYTES))
    return size


def _write_faiss_member(f, index) -> None:
    """The index as a 1-d uint8 .npy member (what faiss.serialize_index would give), streamed."""
    import faiss

    size = serialized_size(index)  # the .npy header comes first; serialising twice costs CPU, not memory
    np.lib.format.write_array_header_2_0(f, {"descr": "|u1", "fortran_order": False, "shape": (size,)})
    faiss.write_index(index, faiss.PyCallbackIOWriter(lambda data: f.write(data), STREAM_BYTES))


def write_checkpoint(path: Path, header: dict, arrays: dict[str, Any]) -> None:
    """One .npz file: the JSON header (log position, index kind...) and the arrays, written atomically.
    A value that is a FAISS index (not an array) is streamed into its member."""
    members = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays}
    with atomic_file(path) as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, value in members.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
                if isinstance(value, np.ndarray):
                    np.lib.format.write_array(f, value, allow_pickle=False)
                else:
                    _write_faiss_member(f, value)


class CheckpointReader:
    """An open checkpoint: the header at once, arrays on demand, a FAISS member streamed into FAISS."""

    def __init__(self, path: Path):
        self.npz = np.load(path, allow_pickle=False)
        try:
            self.header = json.loads(bytes(self.npz["header"]).decode())
        except BaseException:
            self.npz.close()
            raise
        if not isinstance(self.header, dict):
            self.npz.close()
            raise ValueError("the checkpoint header is not a JSON object")

    def __contains__(self, name: str) -> bool:
        return name in self.npz.files

    def array(self, name: str) -> np.ndarray:
        return self.npz[name]

    def member_size(self, name: str) -> int:
        """Bytes of a member as stored (what faiss_index reads, give or take the .npy header)."""
        return self.npz.zip.getinfo(f"{name}.npy").file_size

    def faiss_index(self, name: str = "index", on_read: Callable[[int], None] | None = None):
        """Reads the member straight into a FAISS index (no serialised copy in memory); `on_read(bytes so
        far)` after each megabyte, for progress lines."""
        import faiss

        with self.npz.zip.open(f"{name}.npy") as member:
            version = np.lib.format.read_magic(member)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = reader(member)
            if dtype != np.uint8 or len(shape) != 1:
                raise ValueError(f"member {name} is a {dtype} array of shape {shape}, not a serialised index")
            read = member.read
            if on_read is not None:
                done = 0

                def read(size: int) -> bytes:
                    nonlocal done
                    data = member.read(size)
                    done += len(data)
                    on_read(done)
                    return data

            return faiss.read_index(faiss.PyCallbackIOReader(read, STREAM_BYTES))

    def close(self) -> None:
        self.npz.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_checkpoint(path: Path) -> tuple[dict, dict[str, np.ndarray]] | None:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(bytes(data["header"]).decode())
        arrays = {k: data[k] for k in data.files if k != "header"}
    return header, arrays
