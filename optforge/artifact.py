"""Artifacts: the model directories that flow between passes, and the promoted output with its manifest.

A `ModelArtifact` is a directory holding an HF-style model (config, tokenizer, safetensors weights) plus
`optforge.json`, which records the quantized layout of its modules and the properties the passes rely on.
Its `digest` is the sha256 of its file table, so it can key caches. The build's output is the same directory
plus `manifest.json`, written into a staging sibling and swapped into place at the end (`optforge.durable`).
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

from optforge.durable import publish_dir, remove_stale_staging, staging_sibling
from optforge.errors import ArtifactError
from optforge.hashing import file_table, sha256_file, sha256_json

log = logging.getLogger(__name__)

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
    def open(cls, path: str | Path, files: list[dict] | None = None) -> "ModelArtifact":
        """Open a model directory; `files` is its file table when the caller has just verified it (a cache
        entry), else the files are hashed here."""
        path = Path(path)
        layout_path = path / LAYOUT_FILE
        if not layout_path.is_file():
            raise ArtifactError(f"{path}: not an optforge model directory (no {LAYOUT_FILE})")
        layout = json.loads(layout_path.read_text())
        if layout.get("format") != LAYOUT_FORMAT:
            raise ArtifactError(f"{layout_path}: format {layout.get('format')!r}, expected {LAYOUT_FORMAT!r}")
        return cls(path=path, digest=directory_digest(path, files), layout=layout)


def directory_digest(path: Path, files: list[dict] | None = None) -> str:
    rows = [r for r in (files if files is not None else file_table(path)) if r["path"] != MANIFEST_FILE]
    return sha256_json(rows)


def write_layout(path: Path, *, properties: frozenset[str] | set[str], modules: dict[str, dict] | None = None, extra: dict | None = None) -> None:
    layout = {"format": LAYOUT_FORMAT, "properties": sorted(properties), "modules": modules or {}}
    layout.update(extra or {})
    (path / LAYOUT_FILE).write_text(json.dumps(layout, indent=1, sort_keys=True))


# ------------------------------------------------------------------------------------- atomic output


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A staging sibling of `final`, published onto it (flushed, then swapped in atomically) only if the block
    finishes without an error. An existing `final` stays whole until the new tree is in place."""
    final = Path(final)
    remove_stale_staging(final.parent)
    tmp = staging_sibling(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, final)


def is_artifact_dir(path: Path) -> bool:
    """True for a folder that holds an optforge build's output and nothing else (its manifest lists every file)."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        listed = {row["path"] for row in manifest["files"]} | {MANIFEST_FILE}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() or p.is_symlink()}
    return "schema_version" in manifest and present <= listed


def check_output_path(out: Path, *, force: bool = False, protected: dict[str, Path] | None = None) -> None:
    """Refuse an output path whose replacement would destroy something that is not an optforge artifact.

    Never allowed, even with `force`: a folder that is, or contains, one of `protected` (what -> path: the
    source model, the cache, the recipe, the working directory, the home directory) or the filesystem root.
    A non-empty folder that is not an artifact is replaced only with `force`."""
    out = Path(out).resolve()
    guarded = {"the filesystem root": Path(out.anchor), "your home directory": Path.home(), "the current directory": Path.cwd(), **(protected or {})}
    for what, path in guarded.items():
        path = Path(path).expanduser().resolve()
        if out == path or out in path.parents:
            raise ArtifactError(f"output path {out} is {what} or holds it ({path}); building would replace it. Choose a new folder, e.g. --output build/NAME")
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtifactError(f"output path {out} exists and is not a folder; remove it or choose another --output")
    entries = sorted(p.name for p in out.iterdir())
    if not entries or is_artifact_dir(out):
        return
    if force:
        log.warning("replacing %s (not an optforge artifact) because of --force", out)
        return
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise ArtifactError(
        f"output path {out} is a non-empty folder that is not an optforge artifact (it holds {shown}); a build would "
        "replace it. Choose another --output, or pass --force to replace it"
    )


def copy_model_files(src: Path, dst: Path, *, folders: bool = False) -> None:
    """The model files of `src` (its manifest excepted) into `dst`. `folders`: its subfolders too, as publishing
    does (a published artifact holds everything its last pass wrote, such as export.modelopt's checkpoint
    folder); a pass that carries its input's files forward leaves them, since they describe the input."""
    for item in sorted(src.iterdir()):
        if item.is_file() and item.name != MANIFEST_FILE:
            shutil.copy2(item, dst / item.name)
        elif folders and item.is_dir() and not item.is_symlink():
            shutil.copytree(item, dst / item.name)


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


def _listed_file(root: Path, rel: object) -> Path:
    """The file a manifest row names, refusing any path that could leave the artifact (the caller has made sure
    the tree holds no symbolic link)."""
    if not isinstance(rel, str) or not rel or "\\" in rel:
        raise ArtifactError(f"{root}: the manifest lists an invalid file path {rel!r}; rebuild the artifact")
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or ".." in parts or "." in parts:
        raise ArtifactError(f"{root}: the manifest lists '{rel}', a path outside the artifact; refusing to read it (rebuild the artifact)")
    return root.joinpath(*parts)


def _plain_files(root: Path) -> set[str]:
    """Every file under `root`, relative; a symbolic link anywhere (it could lead out of the artifact) is refused."""
    present = set()
    for p in root.rglob("*"):
        if p.is_symlink():
            raise ArtifactError(f"{root}: '{p.relative_to(root).as_posix()}' is a symbolic link; artifacts hold plain files only (rebuild the artifact)")
        if p.is_file():
            present.add(p.relative_to(root).as_posix())
    return present


def verify_artifact(path: str | Path) -> dict:
    """Check every file against the manifest's sizes and sha256; return the manifest or raise ArtifactError.

    Paths that leave the artifact (absolute, `..`, symbolic links) are refused, and so is any file the
    manifest does not list."""
    path = Path(path)
    manifest = read_manifest(path)
    rows = manifest.get("files")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ArtifactError(f"{path}: {MANIFEST_FILE} has no valid 'files' table; rebuild the artifact")
    present = _plain_files(path)  # before any file is read
    for row in rows:
        file, rel = _listed_file(path, row.get("path")), row["path"]
        if not file.is_file():
            raise ArtifactError(f"{path}: file '{rel}' listed in the manifest is missing; rebuild the artifact")
        size = file.stat().st_size
        if size != row.get("bytes"):
            raise ArtifactError(f"{path}: '{rel}' has {size} bytes, the manifest says {row.get('bytes')}: the file was changed or truncated; rebuild the artifact")
        if sha256_file(file) != row.get("sha256"):
            raise ArtifactError(f"{path}: '{rel}' does not match its sha256 in the manifest: the file was modified after the build; rebuild the artifact")
    extra = present - {row["path"] for row in rows} - {MANIFEST_FILE}
    if extra:
        raise ArtifactError(f"{path}: files not in the manifest: {', '.join(sorted(extra))}")
    return manifest


def verify_for_loading(path: str | Path, *, verify: bool = True) -> dict | None:
    """The check every loader runs before it reads a model directory's weights.

    An optforge model directory (it has optforge.json) must carry a manifest that every file matches; a
    missing manifest fails closed. A plain Hugging Face folder never had one and loads unverified, as does
    anything loaded with `verify=False` (`--no-verify`); both are said in the log. Returns the manifest."""
    path = Path(path)
    if not verify:
        log.warning("%s: loading without verifying its files (--no-verify)", path)
        return None
    if (path / MANIFEST_FILE).is_file():
        return verify_artifact(path)
    if (path / LAYOUT_FILE).is_file():
        raise ArtifactError(
            f"{path}: {MANIFEST_FILE} is missing, so its files cannot be verified; rebuild the artifact, "
            "or pass --no-verify to load it unverified"
        )
    log.info("%s: a plain model folder (no %s): loading it unverified", path, MANIFEST_FILE)
    return None


def open_artifact(path: str | Path, *, verify: bool = True) -> ModelArtifact:
    """Open a built artifact (verifying its hashes) as a ModelArtifact for eval or serving."""
    if verify:
        return ModelArtifact.open(path, verify_artifact(path)["files"])  # the hashes just checked give the digest
    return ModelArtifact.open(path)
