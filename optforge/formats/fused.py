"""Module-level fusion: sibling Linears that read the same input run as one matmul (q/k/v, gate/up).

Decode at small batch is a chain of skinny matmuls, each a kernel launch plus a pass over its weight; one
(K, Nq + Nk + Nv) matmul instead of three reads the input once and launches once. The model's own forward
still calls `q_proj(x)`, `k_proj(x)`, `v_proj(x)` in turn, so each sibling is replaced by a `FusedSlice`
that shares one `FusedLinearGroup`: the first call computes the fused product for `x`, the others return
their column slice of it for the same `x` (same tensor object), and the group forgets it after the last
slice. This keeps the Hugging Face forward untouched, so every architecture whose siblings read one input
gets the fusion. Quantized siblings fuse too when their scales are per output row (`stack_linears`), and
keep their low-bit kernel. Limits: the group must be called in the usual order within one forward (a call
with another tensor recomputes: correct, just unfused).
"""

from __future__ import annotations

import torch
from torch import nn

from optforge.errors import ArtifactError
from optforge.formats.fp8 import Fp8Linear
from optforge.formats.int8 import ChannelInt8Linear
from optforge.formats.weight_only import WeightOnlyLinear

# Sibling groups per module type, tried on every submodule that has all the names.
DEFAULT_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _spec(m: nn.Module) -> dict | None:
    """The constructor spec of a quantized module (what two modules must share to be stacked)."""
    if isinstance(m, WeightOnlyLinear):
        return {"bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric}
    if isinstance(m, Fp8Linear):
        return {"strategy": m.strategy, "dynamic": m.dynamic}
    return None


def _row_tensors(m: nn.Module) -> list[tuple[str, int]] | None:
    """Names of m's tensors whose dim 0 runs over output features, each with the output features per row
    (8 for int4 zero points, packed along dim 0); None where m's layout cannot be stacked by rows."""
    if type(m) is nn.Linear:
        names = [("weight", 1)]
    elif isinstance(m, ChannelInt8Linear):
        names = [("weight", 1), ("weight_scale", 1)]
    elif isinstance(m, WeightOnlyLinear):
        names = [("weight_packed" if m.bits == 4 else "weight", 1), ("weight_scale", 1)]
        if not m.symmetric:
            names.append(("weight_zero_point", 8 if m.bits == 4 else 1))
    elif isinstance(m, Fp8Linear) and m.strategy == "channel":  # per-tensor scales differ between members
        names = [("weight", 1), ("weight_scale", 1)]
    else:
        return None
    return names


def can_stack(mods: list[nn.Module]) -> bool:
    """True when `stack_linears` can make one module of `mods` (same class, input, layout and scales)."""
    first = mods[0]
    names = _row_tensors(first)
    if names is None or any(type(m) is not type(first) or _row_tensors(m) != names or m.in_features != first.in_features or _spec(m) != _spec(first) for m in mods):
        return False
    if any(m.out_features % per for m in mods for _, per in names):
        return False
    static = [m.input_scale for m in mods if hasattr(m, "input_scale")]
    return all(torch.equal(s, static[0]) for s in static)


def stack_linears(mods: list[nn.Module], *, share: bool = False) -> nn.Module:
    """One module whose output is the members' outputs side by side: their row tensors concatenated.

    Works for dense nn.Linear and for the quantized modules whose scales are per output row (weight-only
    int8/int4, W8A8, FP8 per channel), so a fused projection keeps its low-bit kernel. With `share`, the
    members are re-pointed at views of the stacked tensors, so no second copy of the weights stays alive.
    """
    if not can_stack(mods):
        raise ValueError(f"cannot stack {[type(m).__name__ for m in mods]}: layouts or scales differ")
    first, names = mods[0], _row_tensors(mods[0])
    out_features = sum(m.out_features for m in mods)
    has_bias = any(m.bias is not None for m in mods)
    if type(first) is nn.Linear:
        fused = nn.Linear(first.in_features, out_features, bias=has_bias, device=first.weight.device, dtype=first.weight.dtype)
    else:
        fused = type(first)(first.in_features, out_features, has_bias, _spec(first)).to(first.weight_scale.device)
    for name, per in names:
        stacked = torch.cat([getattr(m, name).detach() for m in mods])
        _set(fused, name, stacked)
        if share:
            start = 0
            for m in mods:
                _set(m, name, stacked[start // per : (start + m.out_features) // per])
                start += m.out_features
    if has_bias:  # members without a bias add zeros
        dtype = next(m.bias.dtype for m in mods if m.bias is not None)
        bias = [m.bias.detach() if m.bias is not None else torch.zeros(m.out_features, dtype=dtype, device=fused.bias.device) for m in mods]
        _set(fused, "bias", torch.cat(bias))
    if hasattr(fused, "weight_shape"):
        fused.weight_shape = torch.tensor([out_features, first.in_features], dtype=torch.int64)
    if hasattr(first, "input_scale"):
        fused.input_scale = first.input_scale.clone()
    return fused


def _set(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    if isinstance(getattr(module, name), nn.Parameter):
        setattr(module, name, nn.Parameter(tensor, requires_grad=False))
    else:
        setattr(module, name, tensor)
    if hasattr(module, "_prepared"):
        module._prepared = None  # kernel layouts derived from the old tensors


class FusedLinearGroup(nn.Module):
    """One module holding the stacked weights of its members (see `stack_linears`); remembers its last output."""

    def __init__(self, linears: list[nn.Module]):
        super().__init__()
        self.linear = stack_linears(linears)
        self.bounds = []
        start = 0
        for lin in linears:
            self.bounds.append((start, start + lin.out_features))
            start += lin.out_features
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._served = 0

    def slice(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self._input is not x:
            self._input, self._output, self._served = x, self.linear(x), 0
        start, stop = self.bounds[index]
        out = self._output[..., start:stop]
        self._served += 1
        if self._served == len(self.bounds):  # every member served: drop the references
            self._input = self._output = None
        return out


class FusedSlice(nn.Module):
    """Stands where one member Linear stood; returns its columns of the group's fused product."""

    def __init__(self, group: FusedLinearGroup, index: int, in_features: int, out_features: int):
        super().__init__()
        # A plain attribute list, not a submodule: the group is registered once, on the first slice.
        self._group = [group]
        if index == 0:
            self.group = group
        self.index, self.in_features, self.out_features = index, in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group[0].slice(self.index, x)


def fuse_sibling_linears(model: nn.Module, groups: tuple[tuple[str, ...], ...] = DEFAULT_GROUPS) -> dict[str, int]:
    """Fuse each group of sibling nn.Linear children in place; return {"+".join(group): count}."""
    counts = {"+".join(names): 0 for names in groups}
    for module in list(model.modules()):
        for names in groups:
            members = [getattr(module, n, None) for n in names]
            if any(m is None for m in members) or not can_stack(members):
                continue
            group = FusedLinearGroup(members)
            for i, (name, lin) in enumerate(zip(names, members)):
                setattr(module, name, FusedSlice(group, i, lin.in_features, lin.out_features))
            counts["+".join(names)] += 1
    return counts


def apply_fusions(model: nn.Module, fusions: list[dict]) -> nn.Module:
    """Re-apply the module fusions an artifact's optforge.json lists (written by `fuse.linears`); in place.

    The stored weights stay in the standard unfused layout (any Hugging Face consumer loads them); only our
    loader fuses. An unknown kind is an error rather than a silent slow (or wrong) model.
    """
    for fusion in fusions:
        if fusion.get("kind") != "sibling_linears":
            raise ArtifactError(f"unknown module fusion {fusion!r} in optforge.json; this optforge knows 'sibling_linears' (upgrade optforge?)")
        fuse_sibling_linears(model, tuple(tuple(group) for group in fusion["groups"]))
    return model
