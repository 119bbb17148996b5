"""Crash-safe directory writes: staging folders named after their writer, fsync, atomic swaps.

Every directory optforge promotes (a cache entry, a build's output) is first written into a hidden sibling
named `.<name>.tmp-<pid>-<random>`, flushed to disk, given the permissions an ordinary file would get under
the user's umask, and then renamed into place. A process killed at any point leaves at most such a sibling;
`remove_stale_staging` deletes the ones whose writer is no longer alive.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(-[A-Za-z0-9_]+)?$")


def staging_sibling(final: Path, kind: str = "tmp") -> Path:
    """A new empty hidden directory next to `final`, named so a later run can tell whether its writer lives."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.{kind}-{os.getpid()}-", dir=final.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_staging(folder: Path) -> list[Path]:
    """Delete staging siblings in `folder` left by processes that died; returns what was removed. An old tree
    set aside by a swap that was interrupted before the new tree arrived is put back instead."""
    removed = []
    try:
        children = list(folder.iterdir())
    except OSError:
        return removed
    for child in children:
        match = _STAGING.match(child.name)
        if not match or int(match["pid"]) == os.getpid() or _alive(int(match["pid"])):
            continue
        final = folder / match["name"]
        if match["kind"] == "old" and not final.exists():
            os.rename(child, final)
            log.warning("restored %s, set aside by a replacement that was interrupted", final)
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        removed.append(child)
    if removed:
        log.info("removed %d staging folder(s) left in %s by interrupted runs", len(removed), folder)
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_shareable(root: Path) -> None:
    """Give a staged tree the modes a plain `cp` would (0666/0777 less the umask): `mkdtemp` makes it 0700,
    and a serving user other than the builder must be able to read an artifact."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` (and `root` itself) to disk, so a rename that follows
    never publishes a name whose contents are still only in the page cache."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if not path.is_symlink():
            _fsync(path)
    _fsync(root)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_parent(path: Path) -> None:
    _fsync(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_dir(staged: Path, final: Path) -> None:
    """Move a complete staged directory onto `final`. An existing `final` stays whole until the new one is in
    place: the two are swapped atomically where the kernel can, and the old tree is deleted afterwards."""
    make_shareable(staged)
    fsync_tree(staged)
    if not final.exists():
        os.rename(staged, final)
        fsync_parent(final)
        return
    if _exchange(staged, final):  # `staged` now holds the old tree
        fsync_parent(final)
        shutil.rmtree(staged, ignore_errors=True)
        return
    old = staging_sibling(final, "old")
    os.rmdir(old)
    os.rename(final, old)  # the only window without `final`; the old tree survives in `old` until the next run
    os.rename(staged, final)
    fsync_parent(final)
    shutil.rmtree(old, ignore_errors=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the whole new one, never a part: a staging
    sibling (a dead writer's is removed by `remove_stale_staging`), flushed, renamed over `path`, and the
    folder flushed so the rename itself survives a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_parent(path)
