"""export.onnx on the tiny model: graph I/O, parity with PyTorch, greedy tokens, INT8 as QDQ, cache, requires."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optforge.artifact import ModelArtifact
from optforge.errors import PassError
from optforge.model_io import load_model
from optforge.runtime.onnx_runner import OnnxCausalLM


def test_graph_has_explicit_dynamic_kv_cache(onnx_fp32):
    info = ModelArtifact.open(onnx_fp32["output"]).layout["onnx"]
    assert info["opset"] == 18 and info["num_layers"] == 2 and info["num_kv_heads"] == 2 and info["head_dim"] == 16
    inputs = {row["name"]: row for row in info["inputs"]}
    outputs = {row["name"]: row for row in info["outputs"]}
    assert set(inputs) == {"input_ids", "position_ids"} | {f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")}
    assert set(outputs) == {"logits"} | {f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")}
    batch, heads, past, dim = inputs["past_key_values.0.key"]["shape"]
    assert isinstance(batch, str) and isinstance(past, str) and (heads, dim) == (2, 16)  # symbolic B and P
    assert all(isinstance(d, str) for d in inputs["input_ids"]["shape"])
    assert (onnx_fp32["output"] / "model.onnx.data").stat().st_size > 0  # weights are external data


def test_parity_recorded_within_fp32_tolerance(onnx_fp32):
    parity = ModelArtifact.open(onnx_fp32["output"]).layout["onnx"]["parity"]
    assert set(parity["max_abs_logits_diff"]) == {"prefill", "decode"}
    assert max(parity["max_abs_logits_diff"].values()) < 1e-4


def test_prefill_then_decode_matches_pytorch_and_past_grows(onnx_fp32):
    out = onnx_fp32["output"]
    model, _ = load_model(out)
    runner = OnnxCausalLM(out)
    ids = np.array([[5, 17, 42, 7, 99, 3]])
    logits, present = runner.forward(ids[:, :5], np.arange(5)[None], runner.empty_past(1))
    assert present[0].shape == (1, 2, 5, 16)
    logits2, present2 = runner.forward(ids[:, 5:], np.array([[5]]), present)
    assert present2[0].shape == (1, 2, 6, 16)
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(logits, ref[:, :5], atol=1e-4)
    np.testing.assert_allclose(logits2, ref[:, 5:], atol=1e-4)


@pytest.mark.parametrize("which", ["onnx_fp32", "onnx_int8"])
def test_greedy_onnxruntime_tokens_equal_pytorch(which, request):
    out = request.getfixturevalue(which)["output"]
    model, _ = load_model(out)
    prompt = torch.tensor([[11, 12, 13, 14], [40, 41, 42, 43]])
    with torch.no_grad():
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    got = OnnxCausalLM(out).generate(prompt.numpy(), max_new_tokens=12)
    np.testing.assert_array_equal(got, ref.numpy())


def test_int8_layers_are_qdq_with_int8_initializers(onnx_int8):
    import onnx

    out = onnx_int8["output"]
    info = ModelArtifact.open(out).layout["onnx"]
    num_quantized = len(ModelArtifact.open(out).quantized_modules)
    assert num_quantized == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert info["num_qdq_matmuls"] == num_quantized == info["op_counts"]["DequantizeLinear"]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    int8 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8) == num_quantized  # the weights stayed int8 (not constant-folded to float)


def test_rebuild_is_a_cache_hit(onnx_fp32, build_tiny_onnx):
    again = build_tiny_onnx([{"name": "export.onnx"}])
    assert again["manifest"]["passes"][0]["cached"] is True
    assert again["manifest"]["passes"][0]["cache_key"] == onnx_fp32["manifest"]["passes"][0]["cache_key"]


def test_export_keeps_pytorch_weights_of_its_input(onnx_int8, cached_pass_output):
    exported = cached_pass_output(onnx_int8["cache"], onnx_int8["manifest"], 1)
    quantized = cached_pass_output(onnx_int8["cache"], onnx_int8["manifest"], 0)
    assert (exported.path / "model.safetensors").read_bytes() == (quantized.path / "model.safetensors").read_bytes()
    assert exported.properties >= {"onnx_graph", "quantized_weights", "hf_causal_lm"}


def test_parity_failure_is_a_pass_error(build_tiny_onnx):
    with pytest.raises(PassError, match="differ from PyTorch"):
        build_tiny_onnx([{"name": "export.onnx", "config": {"parity_tolerance": 0.0}}])
