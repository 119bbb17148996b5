"""Choosing which Linear layers a quantization pass touches."""

from __future__ import annotations

import re

from torch import nn


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
