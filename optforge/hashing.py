"""sha256 of files and directories, always from their content (never from a path, size or mtime)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

_CHUNK = 1 << 22


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_json(obj: object) -> str:
    return sha256_text(json.dumps(obj, sort_keys=True, default=str))


def file_table(root: Path) -> list[dict]:
    """[{path, bytes, sha256}] for every file under root, sorted by path."""
    rows = []
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rows.append({"path": file.relative_to(root).as_posix(), "bytes": file.stat().st_size, "sha256": sha256_file(file)})
    return rows
