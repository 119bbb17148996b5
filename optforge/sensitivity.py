"""Which decoder layers a low-precision scheme hurts most: the loss increase when only that layer is quantized.

For each decoder layer in turn, its Linear modules are rounded to the scheme (RTN with the scheme's bits and
group, the cheap proxy for calibrated methods of the same grid) while every other layer stays in float; the
sensitivity is the mean next-token NLL on calibration text minus the float model's. A search keeps the most
sensitive layers at a higher precision (`search.fallback`), adding them in this order until its gates pass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from optforge.formats import swap_linear


@dataclass(frozen=True)
class LayerSensitivity:
    layer: int
    # Mean NLL (nats per token) with only this layer quantized, minus the float model's.
    loss_increase: float

    def to_dict(self) -> dict:
        return asdict(self)


def proxy_spec(pass_name: str, config: dict) -> dict:
    """The in-memory scheme that stands for a low-precision pass when scoring sensitivity (RTN on its grid)."""
    bits = int(config.get("bits", 4))
    return {"scheme": "weight_only", "bits": bits, "group_size": config.get("group_size", 128), "symmetric": bool(config.get("symmetric", True))}


def _mean_nll(model: nn.Module, batches: list[torch.Tensor]) -> float:
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for ids in batches:
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total, tokens = total + float(nll), tokens + ids[:, 1:].numel()
    return total / max(tokens, 1)


def _layer_spec(spec: dict, linear: nn.Linear) -> dict:
    group = spec.get("group_size")
    if group and linear.in_features % group:
        spec = {**spec, "group_size": math.gcd(linear.in_features, group)}  # the widest group that divides the row
    return spec


def layer_sensitivities(model: nn.Module, batches: list[torch.Tensor], spec: dict, *, progress=None) -> list[LayerSensitivity]:
    """Per decoder layer (`model.model.layers`), most sensitive first. `batches`: token id tensors (B, T) on the
    model's device. The model is left as it was (each layer's float Linears are put back)."""
    layers = list(model.model.layers)
    base = _mean_nll(model, batches)
    tick = progress("layer sensitivity", len(layers)) if progress else None
    scores = []
    for i, layer in enumerate(layers):
        originals = {name: module for name, module in layer.named_modules() if type(module) is nn.Linear}
        for name, linear in originals.items():
            new = swap_linear(layer, name, _layer_spec(spec, linear))
            new.set_float(linear.weight)
            new.to(linear.weight.device)
        scores.append(LayerSensitivity(i, _mean_nll(model, batches) - base))
        for name, linear in originals.items():  # put the float modules back
            parent_name, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent_name) if parent_name else layer, child, linear)
        if tick:
            tick()
    return sorted(scores, key=lambda s: s.loss_increase, reverse=True)


def layer_exclude_patterns(layers: list[int]) -> list[str]:
    """Regexes (a pass config's `exclude`) that keep these decoder layers' Linears out of a pass."""
    return [rf"(^|\.)layers\.{i}\." for i in sorted(layers)]
