"""Fixtures for the pruning tests: the shared tiny Llama as an optforge model directory, and a pass runner."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from optforge.artifact import ModelArtifact, write_layout
from optforge.context import PassContext
from optforge.pass_ import get_pass, make_config
from optforge.recipe import CalibrationSpec, ModelSpec


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model_dir, tmp_path_factory) -> ModelArtifact:
    path = tmp_path_factory.mktemp("prune-src") / "model"
    shutil.copytree(tiny_model_dir, path)
    write_layout(path, properties={"hf_causal_lm", "float_weights"}, extra={"architecture": "LlamaForCausalLM"})
    return ModelArtifact.open(path)


@pytest.fixture
def run_pass(tmp_path):
    """run_pass(name, artifact, **config) -> output ModelArtifact, calibrated on BoolQ rows 2000-2040."""

    def run(name: str, artifact: ModelArtifact, **config) -> ModelArtifact:
        cls = get_pass(name)
        out = Path(tmp_path) / f"{name}-{len(list(Path(tmp_path).iterdir()))}"
        out.mkdir()
        ctx = PassContext(output_dir=out, model=ModelSpec(source=str(artifact.path)), calibration=CalibrationSpec(rows=(2000, 2040), max_length=64))
        return cls(make_config(cls, config)).run(artifact, ctx)

    return run
