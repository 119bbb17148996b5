"""sha256 of files and directories, with a stat-keyed memo so unchanged big files are hashed once."""

from __future__ import annotations

import hashlib
import json
import os
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


class HashMemo:
    """Remembers file digests keyed by (path, size, mtime_ns) in a JSON file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._memo: dict[str, str] = json.loads(path.read_text())
        except (OSError, ValueError):
            self._memo = {}

    def sha256(self, file: Path) -> str:
        st = os.stat(file)
        key = f"{Path(file).resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in self._memo:
            self._memo[key] = sha256_file(file)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self._memo))
            os.replace(tmp, self.path)
        return self._memo[key]


def file_table(root: Path, memo: HashMemo | None = None) -> list[dict]:
    """[{path, bytes, sha256}] for every file under root, sorted by path."""
    rows = []
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = memo.sha256(file) if memo else sha256_file(file)
        rows.append({"path": file.relative_to(root).as_posix(), "bytes": file.stat().st_size, "sha256": digest})
    return rows
