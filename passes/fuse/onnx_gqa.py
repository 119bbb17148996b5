"""Our GroupQueryAttention rule for decoders exported without an attention-mask input.

onnxscript's own GQA fusion (`ort_fusions/gqa.py`) only fires when the graph has an `attention_mask` input
and its rotary cos/sin come from a MatMul it recognises as a cos/sin cache; `export.onnx` has neither (no
mask input; torch 2.13 traces `position_ids * inv_freq` as a Mul). Without GQA onnxscript falls back to
MultiHeadAttention, which keeps the rotary subgraph, the KV concat, the repeat-kv Expand and four Transposes
per layer outside the fused op, and on CPU that graph ran slower than the unfused one (benchmarks/RESULTS.md).

This rule runs on onnxscript's intermediate form (after its rotary and SDPA fusions, before those are
inlined back) and matches, per layer:

    q/k/v (B, S, H*D) -> Reshape -> Transpose(0,2,1,3) -> [RotaryEmbedding(cos, sin) for q, k]
    present_k/v = Concat(past_k/v, k/v, axis=-2); repeat-kv: Unsqueeze -> Expand -> Reshape
    SDPA(q, k_all, v_all, causal mask) -> Transpose(0,2,1,3) -> Reshape (B, S, H*D)

and writes one com.microsoft.GroupQueryAttention(do_rotary=1) that takes the KV cache directly and returns
`present` (https://github.com/microsoft/onnxruntime/blob/main/docs/ContribOperators.md#com.microsoft.GroupQueryAttention).
Rotary: cos/sin must be exactly Cos/Sin(Concat(f, f)) with f = Cast(positions) * inv_freq (plain or
llama3-style scaled inv_freq; no attention scaling factor), so a (max_positions, D/2) cache made from the
graph's own inv_freq is exact; the graph's `position_ids` input is passed to GQA. The mask must be causal
and depend on nothing but shapes (no data input): a graph with an attention mask is left alone.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

_FUSION_DOMAIN = "ai.onnxruntime._fusion"  # onnxscript's intermediate ops (RotaryEmbedding, SDPA)


def _producer_chain(value: ir.Value | None, ops: list[str]) -> list[ir.Node] | None:
    """The nodes producing `value` through input 0 along `ops` (outermost first), or None on a mismatch."""
    nodes = []
    for op_type in ops:
        node = value.producer() if value is not None else None
        if node is None or node.op_type != op_type:
            return None
        nodes.append(node)
        value = node.inputs[0]
    return nodes


def _inv_freq(cos: ir.Value, fn: str) -> np.ndarray | None:
    """inv_freq (D/2,) when `cos` is Unsqueeze(fn(Concat(f, f))) with f = Cast(pos) * inv_freq, else None."""
    chain = _producer_chain(cos, ["Unsqueeze", fn, "Concat"])
    if chain is None:
        return None
    concat = chain[-1]
    if len(concat.inputs) != 2 or concat.inputs[0] is not concat.inputs[1]:
        return None
    mul = concat.inputs[0].producer()
    if mul is None or mul.op_type != "Mul":
        return None
    consts = [v.const_value for v in mul.inputs if v is not None and v.const_value is not None]
    if len(consts) != 1 or consts[0].numpy().ndim != 1:
        return None
    return consts[0].numpy().astype(np.float64)


def _depends_only_on_shapes(value: ir.Value, graph_inputs: set[ir.Value]) -> bool:
    """True when no graph input reaches `value` except through Shape nodes (a causal mask built from lengths)."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v in graph_inputs:
            return False
        node = v.producer()
        if node is not None and node.op_type != "Shape":
            stack.extend(node.inputs)
    return True


class MaskFreeGroupQueryAttention(pattern.RewriteRuleClassBase):
    def __init__(self, graph: ir.Graph, position_ids: ir.Value, max_positions: int):
        super().__init__("MaskFreeGQA", remove_nodes=False)
        self._graph, self._position_ids, self._max_positions = graph, position_ids, max_positions
        self._caches: dict[bytes, tuple[ir.Value, ir.Value]] = {}

    def pattern(self, op, q_bsd, k_bsd, v_bsd, past_key, past_value, cos, sin, mask):
        q = op.Transpose(op.Reshape(q_bsd, pattern.ANY_VALUE, _outputs=["q_bshd"]), perm=[0, 2, 1, 3])
        k = op.Transpose(op.Reshape(k_bsd, pattern.ANY_VALUE, _outputs=["k_bshd"]), perm=[0, 2, 1, 3])
        v = op.Transpose(op.Reshape(v_bsd, pattern.ANY_VALUE), perm=[0, 2, 1, 3])
        q = op.RotaryEmbedding(q, cos, sin, _domain=_FUSION_DOMAIN, _outputs=["q_rope"])
        k = op.RotaryEmbedding(k, cos, sin, _domain=_FUSION_DOMAIN, _outputs=["k_rope"])
        present_key = op.Concat(past_key, k, axis=-2)
        present_value = op.Concat(past_value, v, axis=-2)
        k_all = op.Reshape(op.Expand(op.Unsqueeze(present_key, pattern.ANY_VALUE), pattern.ANY_VALUE), pattern.ANY_VALUE)
        v_all = op.Reshape(op.Expand(op.Unsqueeze(present_value, pattern.ANY_VALUE), pattern.ANY_VALUE), pattern.ANY_VALUE)
        attention = op.SDPA(q, k_all, v_all, mask, key_format="BHSd", _domain=_FUSION_DOMAIN, _outputs=["attention"])
        out = op.Reshape(op.Transpose(attention, perm=[0, 2, 1, 3]), pattern.ANY_VALUE)
        return out, present_key, present_value

    def check(self, context, q_bshd, k_bshd, q_rope, k_rope, cos, sin, mask, attention, **_):
        result = pattern.MatchResult()
        dims = [v.shape[i] if v.shape is not None and len(v.shape) == 4 else None for v, i in ((q_bshd, 2), (k_bshd, 2), (q_bshd, 3))]
        if not all(isinstance(d, int) for d in dims):
            return result.fail("num_heads / kv_num_heads / head_dim not static", [q_bshd, k_bshd])
        heads, kv_heads, head_dim = dims
        for rope in (q_rope, k_rope):
            if rope.producer().attributes.get_int("interleaved", 0) != 0:
                return result.fail("interleaved rotary not handled", rope)
        inv_cos, inv_sin = _inv_freq(cos, "Cos"), _inv_freq(sin, "Sin")
        if inv_cos is None or inv_sin is None or not np.array_equal(inv_cos, inv_sin) or inv_cos.shape != (head_dim // 2,):
            return result.fail("rotary cos/sin are not Cos/Sin(positions * inv_freq)", [cos, sin])
        if not _depends_only_on_shapes(mask, set(context.graph_or_function.inputs)):
            return result.fail("attention mask depends on a graph input: not a plain causal mask", mask)
        scale = attention.producer().attributes.get_float("scale", None)
        if scale is not None and not math.isclose(scale, head_dim**-0.5, rel_tol=1e-6):
            return result.fail(f"SDPA scale {scale} is not 1/sqrt(head_dim)", attention)
        self._heads, self._kv_heads, self._inv = heads, kv_heads, inv_cos
        return True

    def _cos_sin_cache(self) -> tuple[ir.Value, ir.Value]:
        """(max_positions, D/2) cos and sin, one pair shared by every layer with the same inv_freq."""
        key = self._inv.tobytes()
        if key not in self._caches:
            angles = np.arange(self._max_positions, dtype=np.float64)[:, None] * self._inv[None, :]
            pair = []
            for fn, name in ((np.cos, "cos"), (np.sin, "sin")):
                value = ir.Value(name=f"gqa.{name}_cache.{len(self._caches)}", const_value=ir.tensor(fn(angles).astype(np.float32)))
                self._graph.register_initializer(value)
                pair.append(value)
            self._caches[key] = tuple(pair)
        return self._caches[key]

    def rewrite(self, op, q_bsd, k_bsd, v_bsd, past_key, past_value, **_):
        cos_cache, sin_cache = self._cos_sin_cache()
        # GQA's lengths: total = past + new tokens (int32), seqlens_k = total - 1 for every row (no padding).
        total = op.Cast(op.Add(op.Shape(past_key, start=2, end=3), op.Shape(q_bsd, start=1, end=2)), to=ir.DataType.INT32)  # (1,)
        one = op.Constant(value=ir.tensor(np.array([1], dtype=np.int32)))
        seqlens_k = op.Expand(op.Sub(total, one), op.Shape(q_bsd, start=0, end=1))  # (B,)
        return op.GroupQueryAttention(
            q_bsd, k_bsd, v_bsd, past_key, past_value, seqlens_k, op.Squeeze(total), cos_cache, sin_cache, self._position_ids,
            num_heads=self._heads, kv_num_heads=self._kv_heads, do_rotary=1, rotary_interleaved=0,
            _domain="com.microsoft", _outputs=3,
        )


def fuse_mask_free_gqa(model: ir.Model, *, max_positions: int) -> int:
    """Apply the rule to `model` (onnxscript's intermediate form) in place; return how many layers it fused."""
    position_ids = next((v for v in model.graph.inputs if v.name == "position_ids"), None)
    if position_ids is None:
        return 0
    rule = MaskFreeGroupQueryAttention.rule(model.graph, position_ids, max_positions)
    return pattern.RewriteRuleSet([rule]).apply_to_model(model)
