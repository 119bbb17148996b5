"""Content-addressed cache of expensive intermediates: converted sources, pass outputs, eval results.

Entries are keyed by sha256 of what produced them. Directory entries are built in a temporary sibling and
renamed into place, so a crash never leaves a half-written entry that a later run would trust.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from optforge.hashing import HashMemo


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "optforge"


class Cache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_cache_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.memo = HashMemo(self.root / "file-hashes.json")

    def dir_entry(self, kind: str, key: str) -> Path | None:
        path = self.root / kind / key
        return path if path.is_dir() else None

    @contextmanager
    def new_dir_entry(self, kind: str, key: str) -> Iterator[Path]:
        """Yield a staging dir; on success it becomes the entry (kind, key)."""
        parent = self.root / kind
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.tmp-", dir=parent))
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = parent / key
        if final.exists():  # a concurrent build finished first; the content is the same by construction
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, final)

    def get_json(self, kind: str, key: str) -> dict | None:
        path = self.root / kind / f"{key}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def put_json(self, kind: str, key: str, value: dict) -> None:
        path = self.root / kind / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)
