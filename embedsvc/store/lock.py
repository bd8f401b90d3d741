"""The data directory's single-writer lock: one process at a time may open a local store.

Two processes on one directory would each search only their own writes and stamp checkpoints with
the other's log positions. An exclusive `flock` on `LOCK` is held for the store's lifetime; the kernel
releases it when the process dies, SIGKILL included, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional

from embedsvc.errors import DataDirLocked

LOCK_NAME = "LOCK"


class DataDirLock:
    def __init__(self, folder: Path):
        path = folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirLocked(f"data directory {folder} is in use by another embedsvc process (pid {holder}); "
                                f"write through that server with --address HOST:PORT instead, or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd: Optional[int] = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
