"""Artifacts: the model directories that flow between passes, and the promoted output with its manifest.

A `ModelArtifact` is a directory holding an HF-style model (config, tokenizer, safetensors weights) plus
`optforge.json`, which records the quantized layout of its modules and the properties the passes rely on.
Its `digest` is the sha256 of its file table, so it can key caches. The build's output is the same directory
plus `manifest.json`, written into a temporary sibling and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from optforge.errors import ArtifactError
from optforge.hashing import HashMemo, file_table, sha256_file, sha256_json

LAYOUT_FILE = "optforge.json"
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
LAYOUT_FORMAT = "optforge-model/1"


@dataclass(frozen=True)
class ModelArtifact:
    """A model directory plus what passes may rely on. Treat the directory as read-only."""

    path: Path
    # Content digest (sha256 over the sorted file table); keys the pass and eval caches.
    digest: str
    # Layout from optforge.json: `properties` (list) and `modules` ({module name: scheme dict}).
    layout: dict = field(default_factory=dict)

    @property
    def properties(self) -> frozenset[str]:
        return frozenset(self.layout.get("properties", ()))

    @property
    def quantized_modules(self) -> dict[str, dict]:
        return dict(self.layout.get("modules", {}))

    def weight_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.glob("*.safetensors"))

    @classmethod
    def open(cls, path: str | Path, memo: HashMemo | None = None) -> "ModelArtifact":
        path = Path(path)
        layout_path = path / LAYOUT_FILE
        if not layout_path.is_file():
            raise ArtifactError(f"{path}: not an optforge model directory (no {LAYOUT_FILE})")
        layout = json.loads(layout_path.read_text())
        if layout.get("format") != LAYOUT_FORMAT:
            raise ArtifactError(f"{layout_path}: format {layout.get('format')!r}, expected {LAYOUT_FORMAT!r}")
        return cls(path=path, digest=directory_digest(path, memo), layout=layout)


def directory_digest(path: Path, memo: HashMemo | None = None) -> str:
    rows = [r for r in file_table(path, memo) if r["path"] != MANIFEST_FILE]
    return sha256_json(rows)


def write_layout(path: Path, *, properties: frozenset[str] | set[str], modules: dict[str, dict] | None = None, extra: dict | None = None) -> None:
    layout = {"format": LAYOUT_FORMAT, "properties": sorted(properties), "modules": modules or {}}
    layout.update(extra or {})
    (path / LAYOUT_FILE).write_text(json.dumps(layout, indent=1, sort_keys=True))


# ------------------------------------------------------------------------------------- atomic output


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A temporary sibling of `final`, renamed onto it only if the block finishes without an error."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(src: Path, dst: Path) -> None:
    """Move `src` onto `dst`; an existing `dst` is swapped out first and removed after the swap."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_model_files(src: Path, dst: Path) -> None:
    for item in sorted(src.iterdir()):
        if item.is_file() and item.name != MANIFEST_FILE:
            shutil.copy2(item, dst / item.name)


# ------------------------------------------------------------------------------------------ loading


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact directory")
    if not manifest_path.is_file():
        raise ArtifactError(f"{path}: not an optforge artifact (no {MANIFEST_FILE}); build one with `optforge build RECIPE`")
    try:
        return json.loads(manifest_path.read_text())
    except ValueError as exc:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({exc})") from exc


def verify_artifact(path: str | Path) -> dict:
    """Check every file against the manifest's sizes and sha256; return the manifest or raise ArtifactError."""
    path = Path(path)
    manifest = read_manifest(path)
    listed = {row["path"]: row for row in manifest.get("files", [])}
    for rel, row in listed.items():
        file = path / rel
        if not file.is_file():
            raise ArtifactError(f"{path}: file '{rel}' listed in the manifest is missing; rebuild the artifact")
        size = file.stat().st_size
        if size != row["bytes"]:
            raise ArtifactError(f"{path}: '{rel}' has {size} bytes, the manifest says {row['bytes']}: the file was changed or truncated; rebuild the artifact")
        if sha256_file(file) != row["sha256"]:
            raise ArtifactError(f"{path}: '{rel}' does not match its sha256 in the manifest: the file was modified after the build; rebuild the artifact")
    extra = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - set(listed) - {MANIFEST_FILE}
    if extra:
        raise ArtifactError(f"{path}: files not in the manifest: {', '.join(sorted(extra))}")
    return manifest


def open_artifact(path: str | Path, *, verify: bool = True) -> ModelArtifact:
    """Open a built artifact (verifying its hashes) as a ModelArtifact for eval or serving."""
    if verify:
        verify_artifact(path)
    return ModelArtifact.open(path)
