"""Which Linear layers a pass changes: one selection for every family (quantization, pruning, calibration).

A pass config names them with `include` and `exclude` regexes over qualified module names (`re.search`;
exclude wins). Only plain `nn.Linear` modules are candidates, so already-quantized modules are never picked.

Mixture-of-experts models (Qwen3-MoE, Mixtral, ...):
- the router of a sparse block (`mlp.gate`, `block_sparse_moe.gate`: hidden -> one score per expert) is never
  selected, whatever `include` says (`ROUTER`). In transformers 5.x it is a router module holding a `weight`
  parameter, not an nn.Linear, so it would not be picked anyway; older releases and other MoE families hold an
  nn.Linear there. Rounding it would change which experts run, a discrete change that no weight-error bound covers.
- the experts: optforge's loader splits HF's 3D expert tensors into one Linear MLP per expert
  (`mlp.experts.3.gate_proj`, formats/experts.py), which passes select like any other Linear. An architecture
  whose experts the loader cannot split keeps 3D parameters (`gate_up_proj` (E, 2I, H), `down_proj` (E, H, I))
  that no pass changes: `pass_targets` logs a warning that names them and their bytes; `expert_parameters` and
  `routers` list both for the layout's precision table (passes/quant/output.py).
"""

from __future__ import annotations

import logging
import re

from torch import nn

from optforge.errors import PassError
from optforge.formats.experts import EXPERTS

log = logging.getLogger(__name__)

ROUTER = re.compile(r"(^|\.)(mlp|block_sparse_moe)\.gate$")  # MoE routers, by qualified module name


def select_linears(model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Linear modules whose qualified name matches any `include` regex and no `exclude` regex (re.search); never
    a MoE router (`ROUTER`)."""
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    chosen = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or ROUTER.search(name):
            continue
        if any(p.search(name) for p in inc) and not any(p.search(name) for p in exc):
            chosen[name] = module
    return chosen


def pass_targets(pass_name: str, model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...]) -> dict[str, nn.Linear]:
    """select_linears for a pass: at least one Linear, and none whose weight is tied to another module's. Warns
    of MoE expert weights, which the pass leaves as they are (`expert_parameters`)."""
    targets = select_linears(model, include, exclude)
    if not targets:
        raise PassError(pass_name, f"no Linear layer matches include={include} exclude={exclude}")
    warn_of_experts(pass_name, model)
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            owners.setdefault(id(weight), []).append(name)
    for name, linear in targets.items():
        others = [o for o in owners.get(id(linear.weight), []) if o != name]
        if others:
            # The loader re-ties a tied lm_head to the float embedding after loading, which would silently
            # replace the changed weight; changing it needs the embedding changed too (not supported).
            raise PassError(
                pass_name,
                f"module '{name}' ({type(model).__name__}) shares its weight with '{others[0]}' (tie_word_embeddings): "
                f"changing a tied Linear is not supported. Keep it in exclude (the default excludes lm_head)",
            )
    return targets


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The expert weights of MoE sparse blocks by qualified name (`model.layers.0.mlp.experts.gate_up_proj`):
    the parameters an `experts` module holds itself. Empty for dense models, and for experts kept as Linear
    modules (transformers 4.x), which `select_linears` picks like any other Linear."""
    found = {}
    for name, module in model.named_modules():
        if EXPERTS.search(name):
            found |= {f"{name}.{key}": p for key, p in module.named_parameters(recurse=False)}
    return found


def routers(model: nn.Module) -> dict[str, nn.Module]:
    """The routers of MoE sparse blocks by qualified module name (`ROUTER`), whatever their type."""
    return {name: module for name, module in model.named_modules() if ROUTER.search(name)}


def warn_of_experts(pass_name: str, model: nn.Module) -> dict[str, nn.Parameter]:
    """Log a warning naming the MoE expert weights a pass leaves unchanged (as float) and their bytes; returns them."""
    experts = expert_parameters(model)
    if experts:
        kinds: dict[str, int] = {}  # name with the layer index as '*' -> how many layers hold it
        for name in experts:
            key = re.sub(r"\.\d+\.", ".*.", name)
            kinds[key] = kinds.get(key, 0) + 1
        size = sum(p.numel() * p.element_size() for p in experts.values())
        dtypes = ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in experts.values()}))
        log.warning("%s: %d MoE expert weight tensors, %d bytes (%.1f MB) of %s, are not Linear layers; this pass leaves them as they are: %s",
                    pass_name, len(experts), size, size / 1e6, dtypes, ", ".join(f"{k} ({n} layers)" for k, n in sorted(kinds.items())))
    return experts
