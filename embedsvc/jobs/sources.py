"""Where bulk indexing reads items from: an image folder, a CSV/JSONL/Parquet manifest, WebDataset shards."""

from __future__ import annotations

import errno
import glob
import json
import os
import stat
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from embedsvc.datasets.manifest import check_manifest_file, read_manifest
from embedsvc.engine.config import EngineConfig
from embedsvc.errors import InvalidInput, UnusableFile

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".heic", ".heif", ".avif")
# Largest image file read, by default: what a server accepts (max_image_bytes).
DEFAULT_MAX_IMAGE_BYTES = EngineConfig.max_image_bytes


@dataclass
class Record:
    # Item id in the collections.
    id: str
    # Where it came from, for the report.
    source: str
    # Reads the encoded bytes (called in a worker thread).
    read: Callable[[], bytes]
    # Caption, if the source has one (stored as metadata "caption").
    caption: str | None = None
    # Other metadata.
    metadata: dict = field(default_factory=dict)
    # Set when the record is known to be unusable before reading (e.g. not an image file).
    refused: str | None = None
    # The file `read` reads, for records of files (the Ray engine's actors read it themselves).
    path: str | None = None


def read_image_file(path: str | Path, limit: int) -> bytes:
    """The bytes of the regular file at `path`, `limit` at most; else UnusableFile with the reason.

    Checked before anything is read: a FIFO is never opened (its reader would wait for a writer forever), a
    device never read (/dev/zero never ends), a file over the limit never loaded. The file is opened
    non-blocking and checked again, in case the path was replaced in between, and read `limit` + 1 bytes at
    most, in case it grew."""
    try:
        _check_file(os.stat(path), limit)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise UnusableFile(_os_reason(path, exc)) from None
    with open(fd, "rb") as f:
        try:
            _check_file(os.fstat(fd), limit)
            data = f.read(limit + 1)
        except OSError as exc:
            raise UnusableFile(_os_reason(path, exc)) from None
    if len(data) > limit:
        raise UnusableFile(f"too large: grew past the limit of {limit:,} bytes while read (--max-image-bytes)")
    return data


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_file(st: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "of an unknown kind")
        raise UnusableFile(f"not a regular file: {kind}")
    if st.st_size > limit:
        raise UnusableFile(_too_large(st.st_size, limit))


def _too_large(size: int, limit: int, member: str = "") -> str:
    return (
        f"too large: {size:,} bytes{f' ({member})' if member else ''}, over the limit of {limit:,} "
        f"(--max-image-bytes); not read"
    )


def _os_reason(path: str | Path, exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "file not found" + (" (a symlink to a missing target)" if os.path.islink(path) else "")
    if exc.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return f"could not read: {exc.strerror or exc}"


def _walk(root: Path) -> Iterator[tuple[Path, str | None]]:
    """(path, None) for every entry under root that is not a folder, hidden ones aside, and (folder, reason)
    for a folder that cannot be listed. Symlinks are listed, not followed: reading them says what they are."""
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as exc:
            if folder == root:
                raise InvalidInput(f"cannot list {root}: {_os_reason(root, exc)}") from None
            yield folder, f"folder not listed: {_os_reason(folder, exc)}"
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                folders.append(Path(entry.path))
            else:
                yield Path(entry.path), None


def folder_records(root: Path, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> list[Record]:
    """Every entry under root but folders (hidden ones aside), id = path relative to root. Files that are not
    jpg/png/webp/gif, and folders that cannot be listed, are kept as refused records so that the report names
    them; so is what is not a regular file once it is read (FIFOs, devices, symlink loops, ...)."""
    records = []
    for path, refused in sorted(_walk(root)):
        rel = path.relative_to(root).as_posix()
        if refused is None and path.suffix.lower() not in IMAGE_SUFFIXES:
            refused = f"not an image file ({path.suffix or 'no extension'}; expected {', '.join(IMAGE_SUFFIXES)})"
        records.append(
            Record(rel, str(path), partial(read_image_file, path, max_bytes), None, {"path": rel}, refused, str(path))
        )
    return records


def manifest_records(manifest: Path, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> list[Record]:
    check_manifest_file(manifest)
    rows = _parquet_rows(manifest) if manifest.suffix == ".parquet" else read_manifest(manifest)
    return [
        Record(
            row.id,
            str(row.path),
            partial(read_image_file, row.path, max_bytes),
            row.caption,
            dict(row.metadata),
            path=str(row.path),
        )
        for row in rows
    ]


def _parquet_rows(manifest: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InvalidInput("Parquet manifests need pyarrow: pip install pyarrow (or use CSV/JSONL)") from None
    import csv
    import io
    import tempfile

    table = pq.read_table(manifest)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=table.column_names)
    writer.writeheader()
    writer.writerows(table.to_pylist())
    with tempfile.NamedTemporaryFile("w", suffix=".csv", dir=manifest.parent, delete=False) as f:
        f.write(buffer.getvalue())
    try:
        return read_manifest(Path(f.name))
    finally:
        Path(f.name).unlink()


def webdataset_records(shards: list[Path], max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> list[Record]:
    """Members grouped by key (name up to the first dot after the last slash): one image per key, with
    optional .txt/.caption (caption) and .json (metadata). A key with a member over max_bytes, or one that is
    not a regular file (a link, a device), is refused unread; so is one whose .json is not a JSON object. A shard
    that is not a tar archive, or ends early, is reported as one refused record (the members before the break
    are kept)."""
    records = []
    for shard in shards:
        archive, members, broken = _tar_members(shard)
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        for member in members:
            if member.isdir():
                continue
            folder, _, name = member.name.rpartition("/")
            key, _, ext = name.partition(".")
            groups.setdefault(f"{folder}/{key}" if folder else key, {})[ext.lower()] = member
        # tarfile objects are not thread-safe; no archive: no members, nothing to read
        reader = partial(_read_member, archive, threading.Lock(), shard) if archive is not None else None
        records += [_webdataset_record(shard, key, group, reader, max_bytes) for key, group in groups.items()]
        if broken:
            records.append(Record(str(shard), str(shard), lambda: b"", refused=broken))
    return records


def _tar_members(shard: Path) -> tuple[tarfile.TarFile | None, list[tarfile.TarInfo], str | None]:
    """The open archive, the members read before its end or a break, and why it broke, if it did."""
    try:
        archive = tarfile.open(shard)  # noqa: SIM115 - open while the records' readers read members from it
    except (tarfile.TarError, OSError) as exc:
        reason = _os_reason(shard, exc) if isinstance(exc, OSError) else "not a tar archive (plain or gz/bz2/xz)"
        return None, [], f"shard not read: {reason}"
    members = []
    try:
        while (member := archive.next()) is not None:
            members.append(member)
    except (tarfile.TarError, OSError, EOFError) as exc:
        return archive, members, f"shard read up to member {len(members)} only: {exc}"
    return archive, members, None


def _read_member(archive: tarfile.TarFile, lock: threading.Lock, shard: Path, member: tarfile.TarInfo) -> bytes:
    try:
        with lock:
            file = archive.extractfile(member)
            assert file is not None  # a regular file: members of other kinds were refused
            return file.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UnusableFile(f"could not read {member.name} from {shard}: {exc}") from None


_MEMBER_KINDS = (
    (tarfile.TarInfo.issym, "a symlink"),
    (tarfile.TarInfo.islnk, "a hard link"),
    (tarfile.TarInfo.isfifo, "a FIFO"),
    (tarfile.TarInfo.ischr, "a character device"),
    (tarfile.TarInfo.isblk, "a block device"),
)


def _webdataset_record(shard: Path, key: str, members: dict[str, tarfile.TarInfo], reader, max_bytes: int) -> Record:
    image_ext = next((e for e in ("jpg", "jpeg", "png", "webp", "gif") if e in members), None)
    caption_member = members.get("txt") or members.get("caption")
    source = f"{shard}:{key}"

    def refused(reason: str, caption=None, metadata=None) -> Record:
        return Record(key, source, lambda: b"", caption, metadata or {}, reason)

    odd = next((m for m in members.values() if not m.isfile()), None)
    if odd is not None:
        kind = next((name for test, name in _MEMBER_KINDS if test(odd)), "of an unknown kind")
        return refused(
            f"not a regular file: member {odd.name} is {kind}"
            + (f" (to {odd.linkname})" if odd.issym() or odd.islnk() else "")
        )
    image_member = members[image_ext] if image_ext is not None else None
    oversized = next(
        (m for m in (image_member, caption_member, members.get("json")) if m is not None and m.size > max_bytes), None
    )
    if oversized is not None:
        return refused(_too_large(oversized.size, max_bytes, oversized.name))
    try:
        caption = reader(caption_member).decode("utf-8", "replace").strip() if caption_member else None
        metadata = _member_json(members["json"], reader(members["json"])) if "json" in members else {}
    except UnusableFile as exc:
        return refused(str(exc))
    if image_ext is None:
        return refused(f"no image member (found {', '.join(sorted(members))})", caption, metadata)
    return Record(
        key,
        source,
        partial(reader, members[image_ext]),
        caption,
        {k: v for k, v in metadata.items() if isinstance(v, (str, int, float, bool))},
    )


def _member_json(member: tarfile.TarInfo, data: bytes) -> dict:
    try:
        value = json.loads(data)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise UnusableFile(f"metadata member {member.name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UnusableFile(f"metadata member {member.name} must hold a JSON object, not {type(value).__name__}")
    return value


def open_source(source: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> list[Record]:
    """The records of an image folder, a manifest or WebDataset shards; their images are read max_bytes at
    most (larger ones are reported as too large, unread)."""
    path = Path(source)
    if path.is_dir():
        return folder_records(path, max_bytes)
    if path.suffix in (".csv", ".jsonl", ".ndjson", ".parquet"):
        return manifest_records(path, max_bytes)
    # glob.glob, not Path().glob: that one refuses an absolute pattern (/data/shards/*.tar)
    shards = sorted(map(Path, glob.glob(source))) if any(c in source for c in "*?[") else [path]
    if shards and all(s.suffix == ".tar" and s.is_file() for s in shards):
        return webdataset_records(shards, max_bytes)
    raise InvalidInput(
        f"cannot read {source!r}: give an image folder, a .csv/.jsonl/.parquet manifest, "
        f"or WebDataset .tar shards (a glob is fine)"
    )
