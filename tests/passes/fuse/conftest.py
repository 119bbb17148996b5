"""Tiny-model exports fused by `fuse.onnx_graph`, fp32 and INT8, built once per session.

Uses the same per-session cache dir as tests/passes/export, so the exports are reused when both folders run."""

from __future__ import annotations

import pytest


def _build(model_dir, tmp_path_factory, passes: list[dict]) -> dict:
    from optforge.pipeline import build

    cache = tmp_path_factory.getbasetemp() / "onnx-cache"
    recipe = {
        "name": "tiny-onnx-fused",
        "model": {"source": str(model_dir), "dtype": "float32"},
        "data": {"calibration": None, "eval": {"perplexity": None}},
        "passes": passes,
        "output": str(tmp_path_factory.mktemp("onnx-fused") / "artifact"),
    }
    result = build(recipe, cache_dir=cache)
    return {"cache": cache, "output": result.output, "manifest": result.manifest}


@pytest.fixture(scope="session")
def fused_fp32(tiny_model_dir, tmp_path_factory) -> dict:
    return _build(tiny_model_dir, tmp_path_factory, [{"name": "export.onnx"}, {"name": "fuse.onnx_graph"}])


@pytest.fixture(scope="session")
def fused_int8(tiny_model_dir, tmp_path_factory) -> dict:
    return _build(tiny_model_dir, tmp_path_factory, [{"name": "quant.int8_weight_only"}, {"name": "export.onnx"}, {"name": "fuse.onnx_graph"}])


@pytest.fixture(scope="session")
def fused_fp32_onnxscript(tiny_model_dir, tmp_path_factory) -> dict:
    passes = [{"name": "export.onnx"}, {"name": "fuse.onnx_graph", "config": {"attention": "onnxscript"}}]
    return _build(tiny_model_dir, tmp_path_factory, passes)
