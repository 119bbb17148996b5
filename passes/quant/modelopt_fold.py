"""AWQ's `pre_quant_scale`s of a ModelOpt-calibrated model folded into the ops ahead, as ModelOpt's own export
does, for `quant.modelopt` (passes/quant/modelopt_quant.py, whose docstring says which Linear goes where): optforge's
int4 Linear has no input scale.
"""

from __future__ import annotations

import torch
from torch import nn

from optforge.errors import PassError


def pre_quant_scale(linear: nn.Module) -> torch.Tensor | None:
    quantizer = getattr(linear, "input_quantizer", None)
    return getattr(quantizer, "_pre_quant_scale", None) if quantizer is not None else None


def recalibrate_weight(linear: nn.Module) -> None:
    """ModelOpt's max calibration of a changed weight (its export re-calibrates the same way)."""
    from modelopt.torch.quantization.model_calib import enable_stats_collection, finish_stats_collection

    quantizer = getattr(linear, "weight_quantizer", None)
    if quantizer is None or not quantizer.is_enabled:
        return
    quantizer.reset_amax()
    enable_stats_collection(quantizer)
    quantizer(linear.weight)
    finish_stats_collection(quantizer)


def scale_columns(linear: nn.Module, factor: torch.Tensor) -> None:
    """W[:, j] *= factor[j] (in float32), then the weight's amax re-calibrated."""
    w = linear.weight
    w.data = (w.data.float() * factor.float().to(w.device)).to(w.dtype)
    recalibrate_weight(linear)


def scale_output(op: nn.Module, s: torch.Tensor, pass_name: str) -> None:
    """Multiply `op`'s output channels by s: a Linear's rows (and bias), else a norm's weight."""
    from optforge.passes.quant.folding import divide_output

    if isinstance(op, nn.Linear):
        op.weight.data = (op.weight.data.float() * s.float().to(op.weight.device).unsqueeze(1)).to(op.weight.dtype)
        if op.bias is not None:
            op.bias.data = (op.bias.data.float() * s.float().to(op.bias.device)).to(op.bias.dtype)
        recalibrate_weight(op)
    else:
        divide_output(op, (1.0 / s.float()).to(op.weight.device, op.weight.dtype), pass_name)


def fold_groups(model: nn.Module, pass_name: str) -> list[tuple[str, tuple[str, ...]]]:
    """(op, Linears reading its output) by qualified name, every decoder layer: the folding map of the
    architecture (`folding.FOLDS`) and v_proj -> o_proj."""
    from optforge.passes.calibration import decoder_layers
    from optforge.passes.quant.folding import model_folds

    folds = model_folds(model, pass_name, ". Use INT4_BLOCKWISE_WEIGHT_ONLY_CFG (no AWQ scales) for this model")
    groups = []
    for i, layer in enumerate(decoder_layers(model, pass_name)):
        prefix = f"model.layers.{i}"
        groups += [(f"{prefix}.{op}", tuple(f"{prefix}.{n}" for n in fed)) for op, fed in folds]
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "v_proj") and hasattr(layer.self_attn, "o_proj"):
            groups.append((f"{prefix}.self_attn.v_proj", (f"{prefix}.self_attn.o_proj",)))
    return groups


def shared_scale(model: nn.Module, op: nn.Module, scales: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale for the op's output, scale the Linears reading it keep): the mean of the group's scales; for
    o_proj under GQA, averaged over the query heads sharing each KV head (ModelOpt's fuse_grouped_heads)."""
    s = torch.stack([t.float() for t in scales]).mean(0)
    out = getattr(op, "out_features", s.numel())
    if out == s.numel():
        return s, s
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    num_kv, rep = out // head_dim, s.numel() // out
    kv = s.view(num_kv, rep, head_dim).mean(1)  # (KV, D): query head h reads KV head h // rep
    return kv.reshape(-1), kv.unsqueeze(1).expand(num_kv, rep, head_dim).reshape(-1)


def fold_pre_quant_scales(model: nn.Module, pass_name: str) -> dict:
    """Fold every AWQ `pre_quant_scale` of the ModelOpt model into the op ahead, in place (the model stays a ModelOpt
    model, its fake quant the reference of the conversion). Returns {"folded": {op: Linears}, "resmoothed": [...],
    "changed_float": [modules whose float parameters changed]}; PassError for a scale with no op to fold into."""
    folded, resmoothed, changed = {}, [], []
    for op_name, fed in fold_groups(model, pass_name):
        members = {n: model.get_submodule(n) for n in fed}
        scaled = {n: m for n, m in members.items() if pre_quant_scale(m) is not None}
        if not scaled:
            continue
        op = model.get_submodule(op_name)
        out_scale, keep = shared_scale(model, op, [pre_quant_scale(m) for m in scaled.values()])
        for name, linear in members.items():
            old = pre_quant_scale(linear)
            if old is None:  # a float Linear (or one ModelOpt left unscaled) reading the same output: undo the scale
                scale_columns(linear, 1.0 / keep)
                changed.append(name)
                continue
            if not torch.equal(old.float(), keep.to(old.device)):
                scale_columns(linear, old.float().to(keep.device) / keep)  # re-smoothed: W * s_old / s_shared
                resmoothed.append(name)
            delattr(linear.input_quantizer, "_pre_quant_scale")
        scale_output(op, out_scale, pass_name)
        changed.append(op_name)
        folded[op_name] = sorted(scaled)
    left = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pre_quant_scale(m) is not None)
    if left:
        raise PassError(pass_name, f"{len(left)} Linear(s) keep an AWQ pre_quant_scale with no op ahead of them to fold it into (e.g. '{left[0]}'), "
                                   "and optforge's int4 Linear has no input scale: exclude them, or use INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    return {"folded": folded, "resmoothed": sorted(resmoothed), "changed_float": sorted(set(changed))}


