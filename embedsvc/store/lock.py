"""The data directory's single-writer lock: one process at a time may open a local store.

Two processes on one directory would each search only their own writes and stamp checkpoints with
the other's log positions. The holder keeps two exclusive `flock`s for the store's lifetime: on the data
directory itself, which cannot be unlinked away while the store lives in it (deleting `LOCK` by hand once
let a second server open a live directory), and on `LOCK`, which records the holder's pid and is the lock
earlier versions take. The kernel releases both when the process dies, SIGKILL included, so a crash never
leaves a stale lock behind and nothing ever needs deleting.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from embedsvc.errors import DataDirLocked, FailedPrecondition

LOCK_NAME = "LOCK"
# Opening `LOCK` and locking it are two steps: if the file is swapped in between, open it again this often.
_LOCK_FILE_ATTEMPTS = 5


class DataDirLock:
    def __init__(self, folder: Path):
        self.folder = folder
        self.dir_fd: int | None = None
        self.fd: int | None = None
        try:
            self.dir_fd = self._lock_directory()
            self.fd = self._lock_file()
        except BaseException:
            self.release()
            raise
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:  # a full disk: the owner's pid cannot be recorded
            self.release()
            raise FailedPrecondition(
                f"data directory {self.folder} cannot be written now ({exc.strerror or exc}): "
                f"free space on its disk or make it writable, then start again"
            ) from None

    def _lock_directory(self) -> int:
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._in_use(_flock_holder(self.folder)) from None
        except OSError as exc:
            os.close(fd)
            raise FailedPrecondition(
                f"cannot lock data directory {self.folder} ({exc.strerror or exc}): its file "
                f"system does not support flock; use a directory on a local file system"
            ) from None
        return fd

    def _lock_file(self) -> int:
        """`LOCK`, locked and still the file at its path (not unlinked or replaced between the open and the flock)."""
        path = self.folder / LOCK_NAME
        for _ in range(_LOCK_FILE_ATTEMPTS):
            fd = self._open_lock_file(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a holder of an older embedsvc, which locks LOCK alone
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                os.close(fd)
                raise self._in_use(holder or _flock_holder(path)) from None
            if _same_file(fd, path):
                return fd
            os.close(fd)
        raise DataDirLocked(
            f"data directory {self.folder}: {path} keeps being replaced while it is being locked; "
            f"stop whatever deletes or rewrites it"
        )

    def _open_lock_file(self, path: Path) -> int:
        """`LOCK` opened (created if missing); anything but a regular file there is refused, naming what it is
        (a directory or FIFO made by hand raised a bare OSError, or failed only at the truncation after the lock)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            kind = _kind_of(path)
            if kind == "regular file":
                raise FailedPrecondition(
                    f"cannot open the lock file {path} of data directory {self.folder}: "
                    f"{exc.strerror or exc}; make it readable and writable by this user"
                ) from None
            fd = None
        else:
            kind = _kind_of(fd)
        if kind != "regular file":
            if fd is not None:
                os.close(fd)
            raise FailedPrecondition(
                f"{path} is a {kind}, not a regular file: embedsvc keeps its lock file there. "
                f"Move that {kind} out of data directory {self.folder} and start again"
            )
        assert fd is not None  # a regular file at `path` with no descriptor raised above
        return fd

    def _in_use(self, holder: str) -> DataDirLocked:
        return DataDirLocked(
            f"data directory {self.folder} is in use by another embedsvc process (pid {holder or 'unknown'}); write "
            f"through that server with --address HOST:PORT instead, or stop it first. Never delete "
            f"{self.folder / LOCK_NAME} to clear this: the lock is the kernel's, it goes when the holding process "
            f"exits (even when killed), and deleting the file does not release it"
        )

    def release(self) -> None:
        for name in ("fd", "dir_fd"):
            fd = getattr(self, name)
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                setattr(self, name, None)


def _kind_of(target) -> str:
    """What a path or fd is, in words: "regular file", "directory", "FIFO", ... ("missing" when gone)."""
    try:
        mode = os.fstat(target).st_mode if isinstance(target, int) else os.stat(target).st_mode
    except OSError:
        return "missing"
    for test, kind in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return kind
    return "special file"


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _flock_holder(path: Path) -> str:
    """The pid of the process holding a flock on `path`, from /proc/locks (Linux); "" when it cannot be told."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:00:5678 0 EOF"; waiters are marked "->" and shift the fields
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == "WRITE" and fields[5] == wanted:
            return fields[4] if fields[4].isdigit() and fields[4] != "0" else ""
    return ""
