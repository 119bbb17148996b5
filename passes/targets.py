"""Which Linear layers a pass changes: one selection for every family (quantization, pruning, calibration).

A pass config names them with `include` and `exclude` regexes over qualified module names (`re.search`;
exclude wins). Only plain `nn.Linear` modules are candidates, so already-quantized modules are never picked.
"""

from __future__ import annotations

import re

from torch import nn

from optforge.errors import PassError


def select_linears(model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Linear modules whose qualified name matches any `include` regex and no `exclude` regex (re.search)."""
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    chosen = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if any(p.search(name) for p in inc) and not any(p.search(name) for p in exc):
            chosen[name] = module
    return chosen


def pass_targets(pass_name: str, model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...]) -> dict[str, nn.Linear]:
    """select_linears for a pass: at least one Linear, and none whose weight is tied to another module's."""
    targets = select_linears(model, include, exclude)
    if not targets:
        raise PassError(pass_name, f"no Linear layer matches include={include} exclude={exclude}")
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
