"""Our GroupQueryAttention rule: the causal-mask guard, the rotary guard, and the onnxscript-only fallback."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from optforge.artifact import ModelArtifact
from optforge.passes.fuse.onnx_gqa import _depends_only_on_shapes, _inv_freq


def _graph_value(op_type: str, inputs: list[ir.Value], graph: ir.Graph, **attributes) -> ir.Value:
    node = ir.node(op_type, inputs=inputs, attributes=attributes)
    graph.append(node)
    return node.outputs[0]


def test_a_mask_built_from_shapes_passes_and_one_reading_an_input_does_not():
    ids = ir.Value(name="input_ids", shape=ir.Shape(["batch", "seq"]), type=ir.TensorType(ir.DataType.INT64))
    attention_mask = ir.Value(name="attention_mask", shape=ir.Shape(["batch", "seq"]), type=ir.TensorType(ir.DataType.INT64))
    graph = ir.Graph(inputs=[ids, attention_mask], outputs=[], nodes=[], opset_imports={"": 18})
    length = _graph_value("Shape", [ids], graph, start=1, end=2)
    causal = _graph_value("Range", [length, length, length], graph)
    assert _depends_only_on_shapes(causal, set(graph.inputs))
    padded = _graph_value("Mul", [causal, _graph_value("Cast", [attention_mask], graph, to=ir.DataType.INT64)], graph)
    assert not _depends_only_on_shapes(padded, set(graph.inputs))


def _cos_of(graph: ir.Graph, positions: ir.Value, inv_freq: np.ndarray, *, duplicate: bool = True, scale: float | None = None) -> ir.Value:
    inv = ir.Value(name=f"inv_freq{len(graph)}", const_value=ir.tensor(inv_freq))
    graph.register_initializer(inv)
    freqs = _graph_value("Mul", [_graph_value("Cast", [positions], graph, to=ir.DataType.FLOAT), inv], graph)
    other = freqs if duplicate else _graph_value("Neg", [freqs], graph)
    cos = _graph_value("Cos", [_graph_value("Concat", [freqs, other], graph, axis=-1)], graph)
    if scale is not None:  # an attention-scaling factor (some rope types): the cache would be wrong
        factor = ir.Value(name=f"factor{len(graph)}", const_value=ir.tensor(np.array(scale, dtype=np.float32)))
        graph.register_initializer(factor)
        cos = _graph_value("Mul", [cos, factor], graph)
    axes = ir.Value(name=f"axes{len(graph)}", const_value=ir.tensor(np.array([1], dtype=np.int64)))
    graph.register_initializer(axes)
    return _graph_value("Unsqueeze", [cos, axes], graph)


def test_rotary_guard_reads_inv_freq_only_from_the_exact_pattern():
    positions = ir.Value(name="position_ids", shape=ir.Shape(["batch", "seq", 1]), type=ir.TensorType(ir.DataType.INT64))
    graph = ir.Graph(inputs=[positions], outputs=[], nodes=[], opset_imports={"": 18})
    inv_freq = (1.0 / 10000 ** (np.arange(0, 8, 2) / 8)).astype(np.float32)
    np.testing.assert_allclose(_inv_freq(_cos_of(graph, positions, inv_freq), "Cos"), inv_freq)
    assert _inv_freq(_cos_of(graph, positions, inv_freq), "Sin") is None
    assert _inv_freq(_cos_of(graph, positions, inv_freq, duplicate=False), "Cos") is None
    assert _inv_freq(_cos_of(graph, positions, inv_freq, scale=1.2), "Cos") is None


def test_onnxscript_only_mode_keeps_multiheadattention(fused_fp32_onnxscript):
    info = ModelArtifact.open(fused_fp32_onnxscript["output"]).layout["onnx"]
    assert info["op_counts"]["com.microsoft.MultiHeadAttention"] == 2
    assert "com.microsoft.GroupQueryAttention" not in info["op_counts"]
    assert max(info["parity"]["max_abs_logits_diff"].values()) < 1e-4
