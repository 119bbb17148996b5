"""Graph rules of ours, applied after onnxscript's onnxruntime fusions (`optimize_for_ort`).

`int8_qdq_to_matmulnbits`: DequantizeLinear(int8 W (K, N), scale (N,), axis=1) -> MatMul(X, .) becomes
onnxruntime's MatMulNBits(bits=8) (com.microsoft, https://onnxruntime.ai/docs/reference/operators/contrib-ops.html
"com.microsoft.MatMulNBits"). MatMulNBits stores B as uint8 (N, K / block, block) with an implicit zero point
of 2^(bits-1) = 128 and one scale per (column, block), so a per-column symmetric int8 weight maps to it exactly:
u = q + 128 and the column's scale repeated over its blocks. onnxruntime would do the same lowering at
session load (its DQ+MatMul -> MatMulNBits transformer), but then with the session's accuracy level (int8
activations by default, a W8A8-like error); writing the node ourselves pins `accuracy_level` in the graph.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

# Largest block MatMulNBits supports well on CPU; a block must be a power of two >= 16 that divides K.
_MAX_BLOCK = 128


def _block_size(k: int) -> int | None:
    block = _MAX_BLOCK
    while block >= 16:
        if k % block == 0:
            return block
        block //= 2
    return None


def _int8_dequantize_inputs(node: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(q (K, N) int8, scale (N,)) when `node` is a per-column symmetric DequantizeLinear of initializers."""
    if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    q_value, scale_value = node.inputs[0], node.inputs[1]
    if q_value is None or scale_value is None or q_value.const_value is None or scale_value.const_value is None:
        return None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        zero = node.inputs[2].const_value
        if zero is None or np.any(zero.numpy() != 0):
            return None
    axis = node.attributes.get("axis")
    q, scale = q_value.const_value.numpy(), scale_value.const_value.numpy()
    if q.dtype != np.int8 or q.ndim != 2 or scale.shape != (q.shape[1],) or (axis is not None and axis.as_int() not in (1, -1)):
        return None
    return q, scale


def int8_qdq_to_matmulnbits(model: ir.Model, *, accuracy_level: int) -> int:
    """Rewrite every INT8 QDQ MatMul of `model` (in place) into MatMulNBits(bits=8); return how many."""
    graph = model.graph
    rewritten = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        dq = node.inputs[1].producer() if node.inputs[1] is not None else None
        found = _int8_dequantize_inputs(dq) if dq is not None else None
        if found is None:
            continue
        q, scale = found
        k, n = q.shape
        block = _block_size(k)
        if block is None:
            continue
        blocks = k // block
        packed = (q.astype(np.int16) + 128).astype(np.uint8).T.reshape(n, blocks, block)  # (N, K/block, block)
        scales = np.repeat(scale.astype(scale.dtype), blocks)  # (N * K/block,), column-major over blocks
        prefix = node.name or f"matmul{rewritten}"
        b = ir.Value(name=f"{prefix}.qweight", const_value=ir.tensor(np.ascontiguousarray(packed)))
        s = ir.Value(name=f"{prefix}.scales", const_value=ir.tensor(scales))
        graph.register_initializer(b)
        graph.register_initializer(s)
        fused = ir.node(
            "MatMulNBits", inputs=[node.inputs[0], b, s], domain="com.microsoft", name=f"{prefix}.nbits",
            attributes={"K": k, "N": n, "bits": 8, "block_size": block, "accuracy_level": accuracy_level},
        )
        graph.insert_before(node, fused)
        out, old = fused.outputs[0], node.outputs[0]
        out.shape, out.type = old.shape, old.type
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        out.name = old.name
        if not dq.outputs[0].uses():
            graph.remove(dq, safe=True)
        rewritten += 1
    if rewritten and "com.microsoft" not in model.opset_imports:
        model.opset_imports["com.microsoft"] = 1
    return rewritten
