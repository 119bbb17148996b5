"""Writing a quantized model: weights, the layout's precision table, and the compressed-tensors block.

Shared by the passes that swap Linears for quantized modules (weight-only, SmoothQuant W8A8, FP8), so every
quantized artifact lists the precision of every Linear and carries a `quantization_config` that
`transformers` and vLLM read.
"""

from __future__ import annotations

from torch import nn

from optforge.artifact import ModelArtifact


def describe(spec: dict | None) -> str:
    """One precision label per Linear for the layout's `precision` table."""
    if spec is None:
        return "float"
    if spec["scheme"] == "w8a8_int8":
        return f"w8a8 int8 channel/token ({spec.get('method', 'rtn')})"
    if spec["scheme"] == "fp8":
        return f"fp8 e4m3 {spec['strategy']} ({'dynamic' if spec['dynamic'] else 'static'} activations)"
    group = "channel" if spec.get("group_size") is None else f"g{spec['group_size']}"
    return f"int{spec['bits']} {group} {'sym' if spec.get('symmetric', True) else 'asym'} ({spec.get('method', 'rtn')})"


def write_quantized(model: nn.Module, tokenizer, artifact: ModelArtifact, pass_, ctx, modules: dict[str, dict], report: dict) -> ModelArtifact:
    """Save `model` (its Linears in `modules` already swapped) into ctx.output_dir as a new artifact."""
    from optforge.model_io import save_model
    from optforge.passes.output import write_output
    from optforge.passes.quant.compressed_tensors import write_quantization_config

    save_model(model, tokenizer, ctx.output_dir)
    precision = {name: describe(modules.get(name)) for name, m in model.named_modules() if isinstance(m, nn.Linear) or name in modules}
    dense = sorted(n for n, p in precision.items() if p == "float")
    write_quantization_config(ctx.output_dir, modules, dense)
    records = {"precision": precision, "quantization": report}
    return write_output(artifact, pass_, ctx, records=records, modules={**artifact.quantized_modules, **modules})
