"""Artifacts: hash verification on load, atomic promotion."""

import pytest

import optforge
from optforge.artifact import open_artifact, staging_dir, verify_artifact
from optforge.errors import ArtifactError


@pytest.fixture
def artifact(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    return optforge.build(make_recipe(tiny_model_dir, tmp_path / "art", gate_pct=None), cache_dir=cache_dir).output


def test_tampered_weights_are_refused(artifact):
    weights = artifact / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.safetensors.*sha256"):
        open_artifact(artifact)


def test_truncated_and_missing_and_extra_files_are_refused(artifact):
    (artifact / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="config.json"):
        verify_artifact(artifact)


def test_extra_file_is_refused(artifact):
    (artifact / "injected.py").write_text("print('hi')")
    with pytest.raises(ArtifactError, match="injected.py"):
        verify_artifact(artifact)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        verify_artifact(tmp_path)


def test_staging_dir_leaves_nothing_on_error(tmp_path):
    final = tmp_path / "final"
    with pytest.raises(RuntimeError):
        with staging_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
