"""Graph-level fusion of an exported decoder into onnxruntime's fused operators (`fuse.onnx_graph`).

Runs onnxscript's `optimize_for_ort` (pattern rewrites after onnxruntime's transformer optimizer: RMSNorm ->
SimplifiedLayerNormalization, residual add + RMSNorm -> SkipSimplifiedLayerNormalization, rotary embedding,
scaled-dot-product attention with a KV cache -> MultiHeadAttention / GroupQueryAttention) and then our own
rules: attention + rotary + KV concat -> GroupQueryAttention (`onnx_gqa.py`; onnxscript's GQA rule needs an
attention_mask input our export does not have) and INT8 QDQ MatMul -> MatMulNBits (`onnx_rules.py`).
Records node counts and which fusions fired, and checks the fused graph against PyTorch like `export.onnx` does. Limits: which fusions fire depends on the
patterns the exporter emitted; a miss leaves that subgraph unfused (the counts in optforge.json show it).
"""

from __future__ import annotations

import logging
from typing import Literal

from optforge.artifact import ModelArtifact, copy_model_files
from optforge.context import PassContext
from optforge.errors import PassError
from optforge.pass_ import Pass, config, option, register

log = logging.getLogger(__name__)


@config
class OnnxGraphFusionConfig:
    int8_accuracy_level: int = option(
        1, "MatMulNBits accuracy_level for INT8 weight-only layers: 1 computes in fp32 (weight-only numerics), "
        "4 quantizes activations to int8 per block (faster on CPU; a W8A8-like error)"
    )
    parity_tolerance: float = option(1e-3, "largest allowed max |logits(ORT fused) - logits(PyTorch)|, fp32 logit units; raise it with int8_accuracy_level 4")
    attention: Literal["group_query", "onnxscript"] = option(
        "group_query", "group_query: our rule fuses each attention block, rotary and KV concat included, into com.microsoft."
        "GroupQueryAttention (faster on CPU); onnxscript: only onnxscript's rules (MultiHeadAttention, slower here)"
    )


def fuse_graph(src, dst, *, int8_accuracy_level: int, max_positions: int | None = None) -> dict:
    """Fuse the ONNX file `src` into `dst` (+ external data); return counts before/after and per fusion.

    With `max_positions` (the rotary cos/sin cache length), attention is fused to GroupQueryAttention by our
    rule first (`onnx_gqa.py`); onnxscript's fusions then do the rest (and MultiHeadAttention where GQA missed).
    """
    import onnx_ir as ir
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass, RemoveUnusedNodesPass
    from onnxscript.rewriter.ort_fusions import _core as ort_core
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    from optforge.passes.fuse.onnx_gqa import fuse_mask_free_gqa
    from optforge.passes.fuse.onnx_rules import int8_qdq_to_matmulnbits

    model = ir.load(str(src))
    nodes_before = len(model.graph)
    # The rewriters log every pattern they try at INFO (thousands of lines on a 30-layer model).
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING)
    try:
        gqa = 0
        if max_positions:
            # onnxscript's intermediate form (private API, onnxscript 0.7): rotary and SDPA fused, not yet inlined.
            model = ort_core._pre_optimize(model)
            ort_core.fuse_rotary_embedding(model)
            ort_core.fuse_sdpa(model, apply_shape_inference=True)
            gqa = fuse_mask_free_gqa(model, max_positions=max_positions)
        model, counts = optimize_for_ort(model)
        counts = {name: n for name, n in counts.items() if n}
        if gqa:
            counts["group_query_attention"] = gqa
            CommonSubexpressionEliminationPass()(model)  # GQA's length inputs, computed once per layer
        counts["int8_matmulnbits"] = int8_qdq_to_matmulnbits(model, accuracy_level=int8_accuracy_level)
        RemoveUnusedNodesPass()(model)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    ir.save(model, str(dst), external_data=dst.name + ".data")
    return {"num_nodes_before": nodes_before, "num_nodes_after": len(model.graph), "fusions": counts}


@register
class OnnxGraphFusion(Pass):
    """Fuse the exported ONNX graph into onnxruntime's fused operators and check parity."""

    name = "fuse.onnx_graph"
    version = 2  # 2: attention fused to GroupQueryAttention by our rule
    Config = OnnxGraphFusionConfig
    requires = frozenset({"hf_causal_lm", "onnx_graph"})
    produces = frozenset({"hf_causal_lm", "onnx_graph", "onnx_fused"})

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from optforge.errors import require
        from optforge.passes.export.onnx_export import ONNX_DATA_FILE, ONNX_FILE, check_parity, graph_summary
        from optforge.passes.output import load_input, write_output

        require("onnxscript", "fuse.onnx_graph", "pip install onnxscript onnxruntime")
        info = artifact.layout.get("onnx")
        if not info:
            raise PassError(self.name, "its input has no ONNX graph in optforge.json; put `export.onnx` before it")
        if info.get("fused"):
            raise PassError(self.name, "its input graph is already fused; run `fuse.onnx_graph` once")
        copy_model_files(artifact.path, ctx.output_dir)
        for stale in (ONNX_FILE, ONNX_DATA_FILE):
            (ctx.output_dir / stale).unlink()
        onnx_path = ctx.output_dir / ONNX_FILE
        model, _ = load_input(artifact, ctx, fused=True)  # the PyTorch side of the parity check, as served
        max_positions = getattr(model.config, "max_position_embeddings", None) if self.config.attention == "group_query" else None
        counts = fuse_graph(artifact.path / info["file"], onnx_path, int8_accuracy_level=self.config.int8_accuracy_level, max_positions=max_positions)
        parity = check_parity(model, onnx_path, self.config.parity_tolerance, pass_name=self.name)
        log.info("fuse.onnx_graph: %d -> %d nodes, fusions %s, parity %s", counts["num_nodes_before"], counts["num_nodes_after"], counts["fusions"], parity["max_abs_logits_diff"])
        onnx_info = {**info, **graph_summary(onnx_path), **counts, "fused": True, "parity": parity, "int8_accuracy_level": self.config.int8_accuracy_level}
        return write_output(artifact, self, ctx, records={"onnx": onnx_info})
