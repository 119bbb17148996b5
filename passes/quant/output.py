"""Writing a quantized model: weights, the layout's precision table, and the compressed-tensors block.

Shared by the passes that swap Linears for quantized modules (weight-only, SmoothQuant W8A8, FP8), so every
quantized artifact lists the precision of every Linear and carries a `quantization_config` that
`transformers` and vLLM read. Mixture-of-experts routers stay float (`FLOAT_ROUTER`, and in the config's
`ignore`); experts are per-expert Linears (formats/experts.py) quantized like any other, and the report lists
the calibration tokens each router sent to each expert (`expert_tokens`). Experts of an architecture whose 3D
expert tensors optforge cannot split stay float: the precision table lists them as `FLOAT_EXPERTS`, the report
their bytes (`float_experts`).
"""

from __future__ import annotations

from torch import nn

from optforge.artifact import ModelArtifact

FLOAT_EXPERTS = "float (MoE experts, not quantized)"
FLOAT_ROUTER = "float (MoE router, never quantized)"


def describe(spec: dict | None) -> str:
    """One precision label per Linear for the layout's `precision` table."""
    if spec is None:
        return "float"
    if spec["scheme"] == "w8a8_int8":
        return f"w8a8 int8 channel/token ({spec.get('method', 'rtn')})"
    if spec["scheme"] == "fp8":
        method = f", {spec['method']}" if spec.get("method") else ""  # where the scales came from, if not quant.fp8
        return f"fp8 e4m3 {spec['strategy']} ({'dynamic' if spec['dynamic'] else 'static'} activations{method})"
    group = "channel" if spec.get("group_size") is None else f"g{spec['group_size']}"
    return f"int{spec['bits']} {group} {'sym' if spec.get('symmetric', True) else 'asym'} ({spec.get('method', 'rtn')})"


def write_quantized(model: nn.Module, tokenizer, artifact: ModelArtifact, pass_, ctx, modules: dict[str, dict], report: dict) -> ModelArtifact:
    """Save `model` (its Linears in `modules` already swapped) into ctx.output_dir as a new artifact."""
    from optforge.model_io import save_model
    from optforge.passes.output import write_output
    from optforge.passes.quant.compressed_tensors import write_quantization_config
    from optforge.formats.experts import linear_experts
    from optforge.passes.targets import expert_parameters, routers

    save_model(model, tokenizer, ctx.output_dir)
    precision = {name: describe(modules.get(name)) for name, m in model.named_modules() if isinstance(m, nn.Linear) or name in modules}
    dense = sorted(n for n, p in precision.items() if p == "float")
    routing = routers(model)
    write_quantization_config(ctx.output_dir, modules, sorted({*dense, *routing}), model_type=model.config.model_type)
    precision |= {name: FLOAT_ROUTER for name in routing}
    experts = expert_parameters(model)
    if experts:
        precision |= dict.fromkeys(experts, FLOAT_EXPERTS)
        report = {**report, "float_experts": {"tensors": len(experts), "bytes": sum(p.numel() * p.element_size() for p in experts.values())}}
    routed = {name: m.calibration_routed.tolist() for name, m in linear_experts(model).items() if getattr(m, "calibration_routed", None) is not None}
    if routed:  # calibrated on every token by every expert; these are the tokens the routers chose
        report = {**report, "expert_tokens": {"observed": "every token by every expert", "routed": routed}}
    records = {"precision": precision, "quantization": report}
    return write_output(artifact, pass_, ctx, records=records, modules={**artifact.quantized_modules, **modules})
