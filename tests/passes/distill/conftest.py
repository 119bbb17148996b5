"""Fixtures for the distillation tests: a teacher (the tiny Llama) and a student (its MLP-width-pruned self)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from optforge.artifact import ModelArtifact, write_layout
from optforge.context import PassContext
from optforge.pass_ import get_pass, make_config
from optforge.recipe import CalibrationSpec, ModelSpec

CALIBRATION = CalibrationSpec(rows=(2000, 2010), max_length=64)


def run_in_cache(name: str, artifact: ModelArtifact, cache: Path, source: Path, **config) -> ModelArtifact:
    """Run a pass with its output staged under `cache`/passes, as the pipeline does."""
    cls = get_pass(name)
    out = cache / "passes" / f"{name}-{len(list((cache / 'passes').glob('*'))) if (cache / 'passes').is_dir() else 0}"
    out.mkdir(parents=True)
    ctx = PassContext(output_dir=out, model=ModelSpec(source=str(source)), calibration=CALIBRATION)
    return cls(make_config(cls, config)).run(artifact, ctx)


@pytest.fixture
def kd_run():
    """run_in_cache as a fixture: kd_run(name, artifact, cache_dir, source_dir, **config)."""
    return run_in_cache


@pytest.fixture(scope="session")
def teacher_artifact(tiny_model_dir, tmp_path_factory) -> ModelArtifact:
    path = tmp_path_factory.mktemp("kd-teacher") / "model"
    shutil.copytree(tiny_model_dir, path)
    write_layout(path, properties={"hf_causal_lm", "float_weights"}, extra={"architecture": "LlamaForCausalLM"})
    return ModelArtifact.open(path)


@pytest.fixture(scope="session")
def student_artifact(teacher_artifact, tmp_path_factory) -> ModelArtifact:
    cache = tmp_path_factory.mktemp("kd-student-cache")
    return run_in_cache("prune.mlp_width", teacher_artifact, cache, teacher_artifact.path, ratio=0.5, multiple_of=8, num_samples=4, seq_len=32)
