"""The INT8 QDQ -> MatMulNBits rule on a one-MatMul graph: exact numerics, and what it must leave alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from optforge.passes.fuse.onnx_rules import int8_qdq_to_matmulnbits


def _qdq_matmul(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None) -> ir.Model:
    k, n = q.shape
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s")]
    dq_inputs = ["q", "s"]
    if zero_point is not None:
        inits.append(numpy_helper.from_array(zero_point, "z"))
        dq_inputs.append("z")
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", dq_inputs, ["w"], axis=1), helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits,
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("k", [64, 96, 576])  # blocks of 64, 32 and 64
def test_rewrite_is_exact_and_replaces_the_pair(k):
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (k, 48), dtype=np.int8)
    q[0, 0], q[1, 0] = -127, 127  # the extremes survive the uint8 shift
    scale = rng.uniform(0.001, 0.05, 48).astype(np.float32)
    x = rng.standard_normal((5, k)).astype(np.float32)
    model = _qdq_matmul(q, scale)
    assert int8_qdq_to_matmulnbits(model, accuracy_level=1) == 1
    assert [node.op_type for node in model.graph] == ["MatMulNBits"]
    ref = x @ (q.astype(np.float32) * scale)
    np.testing.assert_allclose(_run(model, x), ref, rtol=1e-5, atol=1e-4)


def test_leaves_nonzero_zero_points_and_odd_k_alone():
    q = np.ones((64, 8), dtype=np.int8)
    scale = np.ones(8, dtype=np.float32)
    asymmetric = _qdq_matmul(q, scale, zero_point=np.full(8, 3, dtype=np.int8))
    assert int8_qdq_to_matmulnbits(asymmetric, accuracy_level=1) == 0
    odd = _qdq_matmul(np.ones((40, 8), dtype=np.int8), scale)  # K=40: no power-of-two block >= 16 divides it
    assert int8_qdq_to_matmulnbits(odd, accuracy_level=1) == 0
    assert [node.op_type for node in odd.graph] == ["DequantizeLinear", "MatMul"]
    onnx.checker.check_model(ir.to_proto(odd))
