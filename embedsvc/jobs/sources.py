"""Where bulk indexing reads items from: an image folder, a CSV/JSONL/Parquet manifest, WebDataset shards."""

from __future__ import annotations

import json
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from embedsvc.datasets.manifest import read_manifest
from embedsvc.errors import InvalidInput

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".heic", ".heif", ".avif")


@dataclass
class Record:
    # Item id in the collections.
    id: str
    # Where it came from, for the report.
    source: str
    # Reads the encoded bytes (called in a worker thread).
    read: Callable[[], bytes]
    # Caption, if the source has one (stored as metadata "caption").
    caption: Optional[str] = None
    # Other metadata.
    metadata: dict = field(default_factory=dict)
    # Set when the record is known to be unusable before reading (e.g. not an image file).
    refused: Optional[str] = None


def folder_records(root: Path) -> list[Record]:
    """Every file under root (hidden ones aside), id = path relative to root. Files that are not
    jpg/png/webp/gif are kept as refused records so that the report names them."""
    records = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts):
            continue
        refused = None if path.suffix.lower() in IMAGE_SUFFIXES else \
            f"not an image file ({path.suffix or 'no extension'}; expected {', '.join(IMAGE_SUFFIXES)})"
        records.append(Record(rel, str(path), path.read_bytes, None, {"path": rel}, refused))
    return records


def manifest_records(manifest: Path) -> list[Record]:
    if manifest.suffix == ".parquet":
        rows = _parquet_rows(manifest)
    else:
        rows = read_manifest(manifest)
    return [Record(row.id, str(row.path), row.path.read_bytes, row.caption, dict(row.metadata)) for row in rows]


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


def webdataset_records(shards: list[Path]) -> list[Record]:
    """Members grouped by key (name up to the first dot after the last slash): one image per key, with
    optional .txt/.caption (caption) and .json (metadata)."""
    records = []
    for shard in shards:
        lock = threading.Lock()
        archive = tarfile.open(shard)
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        for member in archive.getmembers():
            if not member.isfile():
                continue
            folder, _, name = member.name.rpartition("/")
            key, _, ext = name.partition(".")
            groups.setdefault(f"{folder}/{key}" if folder else key, {})[ext.lower()] = member

        def reader(member, archive=archive, lock=lock):
            with lock:  # tarfile objects are not thread-safe
                return archive.extractfile(member).read()

        for key, members in groups.items():
            image_ext = next((e for e in ("jpg", "jpeg", "png", "webp", "gif") if e in members), None)
            caption_member = members.get("txt") or members.get("caption")
            caption = reader(caption_member).decode("utf-8", "replace").strip() if caption_member else None
            metadata = json.loads(reader(members["json"])) if "json" in members else {}
            source = f"{shard}:{key}"
            if image_ext is None:
                records.append(Record(key, source, lambda: b"", caption, metadata,
                                      f"no image member (found {', '.join(sorted(members))})"))
            else:
                records.append(Record(key, source, lambda m=members[image_ext]: reader(m), caption,
                                      {k: v for k, v in metadata.items() if isinstance(v, (str, int, float, bool))}))
    return records


def open_source(source: str) -> list[Record]:
    path = Path(source)
    if path.is_dir():
        return folder_records(path)
    if path.suffix in (".csv", ".jsonl", ".ndjson", ".parquet"):
        return manifest_records(path)
    shards = sorted(Path().glob(source)) if any(c in source for c in "*?[") else [path]
    if shards and all(s.suffix == ".tar" and s.is_file() for s in shards):
        return webdataset_records(shards)
    raise InvalidInput(f"cannot read {source!r}: give an image folder, a .csv/.jsonl/.parquet manifest, "
                       f"or WebDataset .tar shards (a glob is fine)")
