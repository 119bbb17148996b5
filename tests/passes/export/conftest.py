"""Tiny-model ONNX exports built once per session through the pipeline, fp32 and INT8.

The cache dir is shared per session with tests/passes/fuse, whose builds then reuse these exports."""

from __future__ import annotations

from pathlib import Path

import pytest

from optforge.artifact import ModelArtifact
from optforge.cache import Cache


def onnx_recipe(model_dir: Path, output: Path, passes: list[dict]) -> dict:
    # No perplexity eval: the ONNX passes check their own parity, and evals would only slow the suite.
    return {
        "name": "tiny-onnx",
        "model": {"source": str(model_dir), "dtype": "float32"},
        "data": {"calibration": None, "eval": {"perplexity": None}},
        "passes": passes,
        "output": str(output),
    }


def pass_output(cache_dir: Path, manifest: dict, index: int) -> ModelArtifact:
    """The cached output of pass `index` of a build (e.g. the unfused export before `fuse.onnx_graph`)."""
    return ModelArtifact.open(Cache(cache_dir).dir_entry("passes", manifest["passes"][index]["cache_key"]).path)


def build_onnx(model_dir: Path, tmp_path_factory, passes: list[dict]) -> dict:
    from optforge.pipeline import build

    cache = tmp_path_factory.getbasetemp() / "onnx-cache"
    out = tmp_path_factory.mktemp("onnx-out") / "artifact"
    result = build(onnx_recipe(model_dir, out, passes), cache_dir=cache)
    return {"cache": cache, "output": result.output, "manifest": result.manifest}


@pytest.fixture(scope="session")
def onnx_fp32(tiny_model_dir, tmp_path_factory) -> dict:
    return build_onnx(tiny_model_dir, tmp_path_factory, [{"name": "export.onnx"}])


@pytest.fixture(scope="session")
def onnx_int8(tiny_model_dir, tmp_path_factory) -> dict:
    return build_onnx(tiny_model_dir, tmp_path_factory, [{"name": "quant.int8_weight_only"}, {"name": "export.onnx"}])


@pytest.fixture(scope="session")
def build_tiny_onnx(tiny_model_dir, tmp_path_factory):
    """build_tiny_onnx(passes) -> {cache, output, manifest}, sharing this session's ONNX cache."""
    return lambda passes: build_onnx(tiny_model_dir, tmp_path_factory, passes)


@pytest.fixture(scope="session")
def cached_pass_output():
    return pass_output
