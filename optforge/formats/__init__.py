"""Quantized weight formats: the modules that hold and run each stored scheme, and how they replace a Linear.

Quantized weights are made by the passes (`optforge.passes.quant`), written by the artifact, and swapped in by
`optforge.model_io.load_model` (gpt-fast's recipe: make the state dict, swap modules, load with `assign=True`).
One scheme per file: `int8` (weight-only and W8A8), `weight_only` (INT4/INT8 grids), `fp8`; `kv_cache` is the
quantized KV cache emulated inside HF attention. Below passes, evals and runtime: the runtime's kernels are
imported only inside `forward`.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from optforge.formats.fp8 import Fp8Linear
from optforge.formats.int8 import Int8WeightOnlyLinear, W8A8Linear
from optforge.formats.weight_only import WeightOnlyLinear

# Scheme name (as written in optforge.json `modules`) -> module class.
SCHEMES: dict[str, type[nn.Module]] = {cls.scheme: cls for cls in (Int8WeightOnlyLinear, WeightOnlyLinear, Fp8Linear, W8A8Linear)}


def swap_linear(model: nn.Module, name: str, spec: dict) -> nn.Module:
    """Replace the Linear at `name` with the module for `spec['scheme']`: weight buffers empty (the caller
    fills them), the Linear's bias carried over as a copy on its device."""
    cls = SCHEMES.get(spec["scheme"])
    if cls is None:
        raise ValueError(f"module '{name}': unknown quantization scheme '{spec['scheme']}' (known: {sorted(SCHEMES)})")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    if not isinstance(old, nn.Linear):
        raise ValueError(f"module '{name}' is {type(old).__name__}, expected nn.Linear to quantize")
    new = cls(old.in_features, old.out_features, old.bias is not None, spec)
    if old.bias is not None:
        new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
    setattr(parent, child, new)
    return new


def replace_linear(model: nn.Module, name: str, spec: dict, fill: Callable[[nn.Module, nn.Linear], object]) -> nn.Module:
    """`swap_linear`, then `fill(new, old)` sets the new module's weights from the old Linear, whose storage is then
    freed (moved to the meta device): a pass that still names the old module (its dict of targets) keeps nothing
    alive, on the host or, for a layer onloaded during calibration, on the GPU."""
    old = model.get_submodule(name)
    new = swap_linear(model, name, spec)
    fill(new, old)
    old.to("meta")
    return new


def quantize_in_memory(model: nn.Module, spec: dict, *, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Swap every nn.Linear (names containing a `skip` entry excepted) for `spec`'s module, rounded from its
    float weights (RTN, on the weights' device). For speed measurements and tests: artifacts come from the
    passes, which calibrate. Returns the swapped names."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not any(s in n for s in skip)]
    for name in names:
        old = model.get_submodule(name)
        new = swap_linear(model, name, spec)
        new.set_float(old.weight)
        new.to(old.weight.device)
    return names


def kernels_used(model: nn.Module) -> dict[str, str | None]:
    """{module name: kernel that ran last} for every quantized module (None: not run yet)."""
    return {name: m.kernel for name, m in model.named_modules() if hasattr(m, "scheme") and hasattr(m, "kernel")}
