"""Reading image-caption manifests (CSV or JSONL) as users keep them: id, path, caption, metadata.

Metadata typing: JSONL values keep their JSON types. A CSV metadata column whose every non-empty value
parses as a number holds numbers (integers when every value is written as one, like pandas' inference);
any other column holds strings. So `label` of 0..9 is numeric and `--filter label=7` finds it.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedsvc.errors import InvalidInput

RESERVED = ("id", "path", "caption")


@dataclass(frozen=True)
class ManifestRow:
    # Item id (the manifest's `id` column, else the path relative to the manifest).
    id: str
    # Image path, resolved against the manifest's folder when relative.
    path: Path
    # Caption, or None when the manifest has none.
    caption: str | None
    # Every other column.
    metadata: dict[str, Any] = field(default_factory=dict)


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Rows of a .csv (header required) or .jsonl manifest; `path` is required in every row."""
    path = Path(path)
    check_manifest_file(path)
    try:
        records = _records(path)
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            f"manifest {path} is not UTF-8 text (byte {exc.object[exc.start]:#x}: {exc.reason}); save it as UTF-8"
        ) from None
    if not records:
        raise InvalidInput(f"manifest {path} has no rows")
    if path.suffix == ".csv":
        records = _typed_columns(records)
    rows = []
    for number, record in enumerate(records, 1):
        raw_path = record.get("path")
        if not raw_path:
            raise InvalidInput(f"{path}: row {number} has no 'path' value")
        if not isinstance(raw_path, str):
            raise InvalidInput(f"{path}: row {number}: 'path' must be a string, not {type(raw_path).__name__}")
        image_path = Path(raw_path)
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        rows.append(
            ManifestRow(
                id=str(raw_path if record.get("id") in (None, "") else record["id"]),  # an id of 0 is the id "0"
                path=image_path,
                caption=record.get("caption") or None,
                metadata={k: v for k, v in record.items() if k not in RESERVED and v not in (None, "")},
            )
        )
    return rows


def check_manifest_file(path: Path) -> None:
    """A manifest must be a regular file: a FIFO or a device would be waited on or read without end."""
    if not path.exists():
        raise InvalidInput(f"manifest {path} does not exist")
    if not path.is_file():
        raise InvalidInput(f"manifest {path} is not a regular file (a folder, FIFO or device?)")


def _records(path: Path) -> list[dict]:
    """The rows of a .csv (a UTF-8 byte-order mark allowed) or .jsonl file, as dicts."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            records = list(csv.DictReader(f))
        for number, record in enumerate(records, 1):
            if None in record:  # DictReader keeps a row's values beyond the header under the key None
                raise InvalidInput(f"{path}: row {number} has more values than the header has columns")
        return records
    if path.suffix not in (".jsonl", ".ndjson"):
        raise InvalidInput(f"manifest {path}: expected a .csv or .jsonl file")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InvalidInput(f"{path}:{number}: not valid JSON ({exc})") from None
                if not isinstance(record, dict):
                    raise InvalidInput(f"{path}:{number}: expected a JSON object, not {type(record).__name__}")
                records.append(record)
    return records


def _number(text: str):
    """int or float for a finite number written in decimal or exponent form, else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    try:
        return int(text)
    except ValueError:
        return value


def _typed_columns(records: list[dict]) -> list[dict]:
    """Metadata columns whose every non-empty value is a number become numbers (id, path, caption stay text)."""
    columns = {k for r in records for k in r if k is not None and k not in RESERVED}
    numeric = {
        c
        for c in columns
        if any(r.get(c) not in (None, "") for r in records)
        and all(_number(r[c].strip()) is not None for r in records if r.get(c) not in (None, ""))
    }
    if not numeric:
        return records
    return [
        {k: _number(v.strip()) if k in numeric and v not in (None, "") else v for k, v in r.items()} for r in records
    ]
