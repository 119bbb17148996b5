"""ONNX export of a causal decoder with explicit KV-cache inputs and outputs (`export.onnx`).

The graph takes `input_ids` (B, S), `position_ids` (B, S) and, per layer, `past_key_values.{i}.key/value`
(B, Hkv, P, D), and returns `logits` (B, S, V) and `present.{i}.key/value` (B, Hkv, P + S, D). Batch, sequence
and past length are dynamic, so the one graph runs prefill (P = 0) and decode (S = 1). It is traced with
`torch.onnx.export(dynamo=True)` from the Hugging Face module itself, so any architecture that torch.export
can trace goes through; one that cannot fails with a PassError naming the model class.

INT8 weight-only layers are written as standard QDQ: DequantizeLinear(int8 (K, N), per-column scale) -> MatMul
(`passes/export/qdq.py`); `fuse.onnx_graph` lowers them to onnxruntime's MatMulNBits. The output directory keeps
the model's safetensors (the pipeline's evals and PyTorch parity read them) and adds `model.onnx`, its weights
in `model.onnx.data` (external data), and an `onnx` section in optforge.json: opset, inputs, outputs, shapes.
The model is traced in the recipe's dtype on the build's device; parity runs onnxruntime on the CPU against
PyTorch on that device. Limits: no attention-mask input (rows of a batch share one length: no left padding), decoder-only models.
"""

from __future__ import annotations

import logging
from pathlib import Path

from optforge.artifact import ModelArtifact, copy_model_files
from optforge.context import PassContext
from optforge.errors import PassError
from optforge.pass_ import Pass, config, option, register

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"


@config
class OnnxExportConfig:
    opset: int = option(18, "ONNX opset of the default domain; 18 is what onnxruntime >= 1.16 and TensorRT 10 read")
    parity_tolerance: float = option(1e-3, "largest allowed max |logits(ORT) - logits(PyTorch)| on a random prefill+decode check, in logit units (fp32)")


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def kv_shape(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a Hugging Face decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def make_cache_wrapper(model):
    """A module whose forward takes and returns the KV cache as flat tensors (what ONNX needs)."""
    import torch
    from transformers import DynamicCache

    class DecoderWithCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids, past):
            cache = DynamicCache(config=self.model.config)
            for layer, (key, value) in enumerate(past):
                cache.update(key, value, layer)
            out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True)
            return out.logits, [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    return DecoderWithCache().eval()


def sample_inputs(config, *, batch: int, seq: int, past: int, dtype, seed: int = 0, device="cpu"):
    """Random (input_ids, position_ids, past) for tracing and parity checks, drawn on the CPU (the same values
    on any device) and placed on `device`."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    layers, kv_heads, head_dim = kv_shape(config)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    cache = [tuple(torch.randn(batch, kv_heads, past, head_dim, generator=gen).to(device, dtype) for _ in range(2)) for _ in range(layers)]
    return ids.to(device), pos.to(device), cache


def export_decoder(model, path: Path, *, opset: int) -> int:
    """Trace `model` with dynamic batch/sequence/past, write `path` (+ external data next to it).

    Returns the number of INT8 weight-only layers written as QDQ. `model` itself is left unchanged.
    """
    import copy

    import torch

    from optforge.passes.export.qdq import swap_int8_for_qdq, translation_table

    model = copy.deepcopy(model)
    num_qdq = swap_int8_for_qdq(model)
    wrapper = make_cache_wrapper(model)
    layers = kv_shape(model.config)[0]
    # Trace at lengths > 1 so torch.export does not specialize the dims to 0 or 1.
    args = sample_inputs(model.config, batch=2, seq=3, past=4, dtype=model.dtype, device=model.device)
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("past")
    dynamic = {
        "input_ids": {0: batch, 1: seq},
        "position_ids": {0: batch, 1: seq},
        "past": [({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(layers)],
    }
    try:
        program = torch.onnx.export(
            wrapper, args, dynamo=True, dynamic_shapes=dynamic, opset_version=opset, custom_translation_table=translation_table(),
            input_names=["input_ids", "position_ids", *past_names(layers)], output_names=["logits", *present_names(layers)],
        )
    except Exception as exc:  # torch.export raises many types; the user needs the model class and the cause
        raise PassError("export.onnx", f"torch.onnx.export failed for {type(model).__name__}: {type(exc).__name__}: {str(exc)[:800]}") from exc
    program.save(str(path), external_data=True)
    return num_qdq


def graph_summary(path: Path) -> dict:
    """Opset, inputs/outputs with symbolic shapes, node count and op histogram of an ONNX file."""
    import collections

    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def io(values):
        rows = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            rows.append({"name": v.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower(), "shape": shape})
        return rows

    ops = collections.Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "inputs": io(model.graph.input), "outputs": io(model.graph.output), "num_nodes": len(model.graph.node), "op_counts": dict(sorted(ops.items()))}


def check_parity(model, onnx_path: Path, tolerance: float, *, pass_name: str) -> dict:
    """Max |logits| difference between onnxruntime and PyTorch on a prefill (B=2, S=5) and a decode step."""
    import numpy as np
    import torch

    from optforge.runtime.onnx_runner import OnnxCausalLM

    runner = OnnxCausalLM(onnx_path.parent, onnx_file=onnx_path.name)
    wrapper = make_cache_wrapper(model)
    diffs = {}
    for label, (seq, past) in {"prefill": (5, 0), "decode": (1, 7)}.items():
        ids, pos, cache = sample_inputs(model.config, batch=2, seq=seq, past=past, dtype=torch.float32, seed=1)
        with torch.no_grad():
            on_device = [(k.to(model.device, model.dtype), v.to(model.device, model.dtype)) for k, v in cache]
            ref = wrapper(ids.to(model.device), pos.to(model.device), on_device)[0].float().cpu().numpy()
        past_np = [t.numpy() for pair in cache for t in pair]
        got = runner.forward(ids.numpy(), pos.numpy(), past_np)[0]
        diffs[label] = float(np.abs(got.astype(np.float32) - ref).max())
    worst = max(diffs.values())
    if not worst <= tolerance:
        raise PassError(pass_name, f"onnxruntime logits differ from PyTorch by {worst:.3g} (> parity_tolerance {tolerance:g}): {diffs}")
    return {"max_abs_logits_diff": diffs, "tolerance": tolerance}


@register
class OnnxExport(Pass):
    """Export the decoder to ONNX with explicit KV-cache inputs/outputs and check it against PyTorch."""

    name = "export.onnx"
    version = 1
    Config = OnnxExportConfig
    requires = frozenset({"hf_causal_lm"})
    produces = frozenset({"hf_causal_lm", "onnx_graph"})

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from optforge.errors import require
        from optforge.passes.output import load_input, write_output

        require("onnx", "export.onnx", "pip install onnx onnxscript onnxruntime")
        require("onnxscript", "export.onnx", "pip install onnx onnxscript onnxruntime")
        model, _ = load_input(artifact, ctx, fused=True)  # traced on the build's device, as the loader gives it
        model.set_attn_implementation("sdpa")
        copy_model_files(artifact.path, ctx.output_dir)
        for stale in (ONNX_FILE, ONNX_DATA_FILE):  # an input that was already exported
            (ctx.output_dir / stale).unlink(missing_ok=True)
        onnx_path = ctx.output_dir / ONNX_FILE
        num_qdq = export_decoder(model, onnx_path, opset=self.config.opset)
        parity = check_parity(model, onnx_path, self.config.parity_tolerance, pass_name=self.name)
        layers, kv_heads, head_dim = kv_shape(model.config)
        summary = graph_summary(onnx_path)
        onnx_info = {
            "file": ONNX_FILE, "data_file": ONNX_DATA_FILE, "dtype": ctx.dtype, "num_layers": layers, "num_kv_heads": kv_heads,
            "head_dim": head_dim, "num_qdq_matmuls": num_qdq, "fused": False, "parity": parity, **summary,
        }
        log.info("export.onnx: %d nodes, opset %s, parity %s", summary["num_nodes"], summary["opset"], parity["max_abs_logits_diff"])
        return write_output(artifact, self, ctx, records={"onnx": onnx_info})
