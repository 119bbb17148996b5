"""Fixtures of the C++ runtime tests: the compiled module (skips with the build command when missing) and
artifacts of the shared tiny Llama with a manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from optforge.hashing import file_table


@pytest.fixture(scope="session")
def rt():
    from optforge.runtime.cpp import BUILD_HINT, is_available, load

    if not is_available():
        pytest.skip(f"C++ runtime extension not built: {BUILD_HINT}")
    return load()


def with_manifest(src: Path, dst: Path) -> Path:
    """A copy of `src` with a manifest.json listing every file (what `optforge build` writes)."""
    shutil.copytree(src, dst)
    (dst / "manifest.json").write_text(json.dumps({"schema_version": 1, "files": file_table(dst)}))
    return dst


@pytest.fixture()
def tiny_artifact(tiny_model_dir, tmp_path) -> Path:
    return with_manifest(tiny_model_dir, tmp_path / "artifact")
