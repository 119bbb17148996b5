"""fuse.onnx_graph: fewer nodes, onnxruntime's fused ops present, parity and greedy tokens kept, requires."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optforge.artifact import ModelArtifact
from optforge.errors import PassError
from optforge.model_io import load_model
from optforge.runtime.onnx_runner import OnnxCausalLM


def test_fp32_fusions_fire_and_shrink_the_graph(fused_fp32):
    info = ModelArtifact.open(fused_fp32["output"]).layout["onnx"]
    assert info["fused"] is True
    assert info["num_nodes_after"] < info["num_nodes_before"] * 0.8
    ops = info["op_counts"]
    # 2 layers: 2 attention blocks, each with rotary, KV concat and repeat-kv inside one GroupQueryAttention;
    # 2 per layer residual+RMSNorm minus the first, plus the final norm.
    assert ops["com.microsoft.GroupQueryAttention"] == 2
    assert info["fusions"]["group_query_attention"] == 2
    for leftover in ("com.microsoft.MultiHeadAttention", "Transpose", "Concat", "Cos", "Sin", "Neg"):
        assert leftover not in ops
    assert ops["com.microsoft.SkipSimplifiedLayerNormalization"] + ops.get("SimplifiedLayerNormalization", 0) + ops.get("com.microsoft.SimplifiedLayerNormalization", 0) == 5
    assert max(info["parity"]["max_abs_logits_diff"].values()) < 1e-4


def test_int8_matmuls_become_matmulnbits(fused_int8):
    info = ModelArtifact.open(fused_int8["output"]).layout["onnx"]
    assert info["fusions"]["int8_matmulnbits"] == 14
    assert info["op_counts"]["com.microsoft.MatMulNBits"] == 14
    assert "DequantizeLinear" not in info["op_counts"]
    assert max(info["parity"]["max_abs_logits_diff"].values()) < 1e-4


@pytest.mark.parametrize("which", ["fused_fp32", "fused_int8"])
def test_fused_greedy_tokens_equal_pytorch(which, request):
    out = request.getfixturevalue(which)["output"]
    model, _ = load_model(out)
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, min_new_tokens=10, do_sample=False)
    np.testing.assert_array_equal(OnnxCausalLM(out).generate(prompt.numpy(), max_new_tokens=10), ref.numpy())


def test_requires_an_exported_graph(tiny_model_dir, tmp_path):
    from optforge.pipeline import build

    recipe = {"model": {"source": str(tiny_model_dir)}, "data": {"calibration": None, "eval": {"perplexity": None}},
              "passes": [{"name": "fuse.onnx_graph"}], "output": str(tmp_path / "out")}
    with pytest.raises(PassError, match="onnx_graph"):
        build(recipe, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists()
