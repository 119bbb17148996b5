"""Content-addressed cache of expensive intermediates: converted sources, pass outputs, eval results.

Entries are keyed by sha256 of what produced them. A directory entry is built in a staging sibling, flushed
to disk and renamed into place under a per-key lock, so concurrent builds of one key compute it once and a
killed build leaves nothing a later run trusts. Beside each directory entry, `<key>.entry.json` records the
sha256 of every file as written; before reuse the files are hashed again (from their content, never from
their size or mtime) and an entry that no longer matches is discarded with a warning and rebuilt. JSON
entries carry the sha256 of their value the same way.

`resume/<key>/` holds what a pass that has not finished saved so far (a calibrated pass's finished layers,
passes/layer_checkpoints.py): a build killed midway continues there. It is written only under the key's lock
and deleted once the pass's entry is in place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from optforge.durable import fsync_parent, publish_dir, remove_stale_staging, staging_sibling
from optforge.hashing import file_table, sha256_json

log = logging.getLogger(__name__)

DIR_KINDS = ("sources", "passes")
RESUME = "resume"
RECORD_SUFFIX = ".entry.json"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "optforge"


@dataclass(frozen=True)
class DirEntry:
    """A verified directory entry: its path and the file table its content hashes to now."""

    path: Path
    files: list[dict]
    # What the build that made the entry measured about itself (a pass's peak memory), where it said.
    run: dict | None = None


@dataclass(frozen=True)
class EntryCheck:
    kind: str
    key: str
    ok: bool
    problem: str = ""


class Cache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_cache_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        for kind in (*DIR_KINDS, "evals"):
            remove_stale_staging(self.root / kind)

    # ---- directory entries --------------------------------------------------------------------------
    def dir_entry(self, kind: str, key: str) -> DirEntry | None:
        """The entry (kind, key) if present and its files still match their record; a corrupt entry is
        discarded (with a warning) and reported as absent."""
        path, record = self.root / kind / key, self._record_path(kind, key)
        if not path.is_dir() and not record.exists():
            return None
        problem = self._problem(path, record)
        if problem is None:
            os.utime(record)  # last use, for `optforge cache prune --older-than`
            saved = self._read_record(record)
            return DirEntry(path, saved["files"], saved.get("run"))
        log.warning("cache entry %s/%s is corrupt (%s): discarding it and rebuilding", kind, key[:12], problem)
        self._discard(kind, key)
        return None

    def get_or_build_dir(self, kind: str, key: str, build: Callable[[Path], dict | None]) -> tuple[DirEntry, bool]:
        """Return ((path, files, run), cached). On a miss, `build(staging_dir)` fills a staging folder that becomes
        the entry only if it returns; what it returns (JSON, e.g. its peak memory) is kept in the entry's record
        as `run`. Concurrent callers of one key wait for the first and reuse its entry."""
        with self._lock(kind, key):
            hit = self.dir_entry(kind, key)
            if hit is not None:
                self._remove_resume(key)  # left by a build killed after another one finished this entry
                return hit, True
            final = self.root / kind / key
            tmp = staging_sibling(final)
            try:
                run = build(tmp)
                files = file_table(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._write_json_atomic(self._record_path(kind, key), {"key": key, "files": files, "created": time.time(), **({"run": run} if run else {})})
            publish_dir(tmp, final)
            self._remove_resume(key)
            return DirEntry(final, files, run), False

    def resume_dir(self, key: str) -> Path:
        """Where the build of entry `key` keeps partial progress until the entry exists (created by its user)."""
        return self.root / RESUME / key

    def _remove_resume(self, key: str) -> None:
        folder = self.resume_dir(key)
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
            log.debug("removed the resume folder of %s", key[:12])

    def _record_path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}{RECORD_SUFFIX}"

    @staticmethod
    def _read_record(record: Path) -> dict:
        return json.loads(record.read_text())

    def _problem(self, path: Path, record: Path) -> str | None:
        """Why the entry at `path` cannot be trusted, or None when every file matches its record."""
        if not path.is_dir():
            return "its directory is missing"
        try:
            expected = self._read_record(record)["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return "its record of file hashes is missing or unreadable"
        if any(p.is_symlink() for p in path.rglob("*")):
            return "it contains a symbolic link"
        actual = file_table(path)
        if actual == expected:
            return None
        want, have = {r["path"]: r for r in expected}, {r["path"]: r for r in actual}
        changed = sorted(p for p in want.keys() | have.keys() if want.get(p) != have.get(p))
        return f"files differ from what was written: {', '.join(changed[:5])}"

    def _discard(self, kind: str, key: str) -> None:
        self._record_path(kind, key).unlink(missing_ok=True)
        path = self.root / kind / key
        if path.exists():
            trash = staging_sibling(path, "tmp")  # a dead-writer name: removed now, or by the next run if killed
            os.rmdir(trash)
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)

    @contextmanager
    def _lock(self, kind: str, key: str) -> Iterator[None]:
        """An exclusive advisory lock on one key; the kernel releases it when the holder dies."""
        import fcntl

        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{kind}-{key}", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def _lock_if_free(self, kind: str, key: str) -> Iterator[bool]:
        """The key's lock if nobody holds it (yields True), else yields False at once."""
        import fcntl

        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{kind}-{key}", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ---- JSON entries -------------------------------------------------------------------------------
    def get_json(self, kind: str, key: str) -> dict | None:
        path = self.root / kind / f"{key}.json"
        try:
            stored = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            stored = None
        if isinstance(stored, dict) and "value" in stored and stored.get("sha256") == sha256_json(stored["value"]):
            return stored["value"]
        log.warning("cache entry %s/%s is corrupt: discarding it and recomputing", kind, key[:12])
        path.unlink(missing_ok=True)
        return None

    def put_json(self, kind: str, key: str, value: dict) -> None:
        self._write_json_atomic(self.root / kind / f"{key}.json", {"sha256": sha256_json(value), "value": value})

    @staticmethod
    def _write_json_atomic(path: Path, value: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(json.dumps(value))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_parent(path)

    # ---- maintenance (`optforge cache ...`) ---------------------------------------------------------
    def dir_keys(self, kind: str) -> list[str]:
        folder = self.root / kind
        if not folder.is_dir():
            return []
        names = {p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
        names |= {p.name[: -len(RECORD_SUFFIX)] for p in folder.glob(f"*{RECORD_SUFFIX}")}
        return sorted(names)

    def verify(self, *, discard: bool = False, progress: Callable[[str], None] | None = None) -> list[EntryCheck]:
        """Re-hash every directory entry against its record and every JSON entry against its checksum."""
        checks = []
        for kind in DIR_KINDS:
            for key in self.dir_keys(kind):
                if progress:
                    progress(f"{kind}/{key[:12]}")
                with self._lock(kind, key):
                    problem = self._problem(self.root / kind / key, self._record_path(kind, key))
                    if problem and discard:
                        self._discard(kind, key)
                checks.append(EntryCheck(kind, key, problem is None, problem or ""))
        for path in sorted((self.root / "evals").glob("*.json")):
            try:
                stored = json.loads(path.read_text())
                ok = isinstance(stored, dict) and stored.get("sha256") == sha256_json(stored.get("value"))
            except (OSError, ValueError):
                ok = False
            if not ok and discard:
                path.unlink(missing_ok=True)
            checks.append(EntryCheck("evals", path.stem, ok, "" if ok else "checksum does not match its value"))
        return checks

    def prune(self, *, older_than_s: float) -> list[str]:
        """Remove entries not used for `older_than_s` seconds, resume folders not written for as long, and staging
        left by dead runs."""
        removed, cutoff = [], time.time() - older_than_s
        for kind in DIR_KINDS:
            remove_stale_staging(self.root / kind)
            for key in self.dir_keys(kind):
                record = self._record_path(kind, key)
                used = record.stat().st_mtime if record.exists() else 0.0
                if used < cutoff:
                    with self._lock(kind, key):
                        self._discard(kind, key)
                    removed.append(f"{kind}/{key}")
        for path in (self.root / "evals").glob("*.json"):
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed.append(f"evals/{path.stem}")
        removed += self._prune_resume(cutoff)
        return removed

    def _prune_resume(self, cutoff: float) -> list[str]:
        """Resume folders whose newest file is older than `cutoff`, skipping any a running build holds."""
        removed = []
        folder = self.root / RESUME
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if not path.is_dir() or path.is_symlink():
                continue
            newest = max((p.lstat().st_mtime for p in path.rglob("*")), default=path.lstat().st_mtime)
            if newest >= cutoff:
                continue
            with self._lock_if_free("passes", path.name) as free:
                if free:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(f"{RESUME}/{path.name}")
        return removed

    def clear(self) -> None:
        """Remove every entry (the cache folder itself stays)."""
        for child in self.root.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file() and not p.is_symlink())
