"""Every loader verifies the artifact it serves: tampered, unlisted or escaping files are refused."""

import json
import os

import pytest
from typer.testing import CliRunner

import optforge
from optforge.artifact import verify_artifact, verify_for_loading
from optforge.cli import app
from optforge.errors import ArtifactError
from optforge.runtime.llm import LLM, EngineConfig

runner = CliRunner()
CONFIG = EngineConfig(num_blocks=64, block_size=4)


@pytest.fixture
def artifact(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    return optforge.build(make_recipe(tiny_model_dir, tmp_path / "art", gate_pct=None), cache_dir=cache_dir).output


def _overwrite_middle(path, n: int) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    n = min(n, len(data) - mid)
    data[mid : mid + n] = os.urandom(n)
    path.write_bytes(bytes(data))


def test_overwritten_weights_are_not_served(artifact):
    _overwrite_middle(artifact / "model.safetensors", 1 << 20)
    with pytest.raises(ArtifactError, match="sha256"):
        LLM(artifact, CONFIG)
    result = runner.invoke(app, ["generate", str(artifact), "hello", "--max-tokens", "2"])
    assert result.exit_code == 2 and "sha256" in result.output


def test_a_missing_manifest_fails_closed_unless_no_verify(artifact, caplog):
    (artifact / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing.*--no-verify"):
        LLM(artifact, CONFIG)
    llm = LLM(artifact, EngineConfig(num_blocks=64, block_size=4, verify=False))
    assert "without verifying" in caplog.text
    assert llm.generate("hello")[0].token_ids


def test_a_plain_model_folder_loads_unverified_and_says_so(tiny_model_dir, caplog):
    import logging

    caplog.set_level(logging.INFO)
    assert verify_for_loading(tiny_model_dir) is None
    assert "plain model folder" in caplog.text


@pytest.mark.parametrize("escape", ["../outside.txt", "/etc/hostname", "sub/../../outside.txt"])
def test_manifest_paths_that_leave_the_artifact_are_refused(artifact, escape):
    (artifact.parent / "outside.txt").write_text("not part of the artifact")
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"].append({"path": escape, "bytes": 0, "sha256": "0" * 64})
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        verify_artifact(artifact)


def test_a_symlink_inside_the_artifact_is_refused(artifact):
    target = artifact.parent / "elsewhere.json"
    target.write_text((artifact / "config.json").read_text())
    (artifact / "config.json").unlink()
    (artifact / "config.json").symlink_to(target)
    with pytest.raises(ArtifactError, match="symbolic link"):
        verify_artifact(artifact)


def test_the_verified_manifest_gives_the_same_digest_as_hashing(artifact):
    from optforge.artifact import ModelArtifact
    from optforge.sources import resolve_artifact

    assert resolve_artifact(artifact).digest == ModelArtifact.open(artifact).digest
