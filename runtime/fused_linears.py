"""Module-level fusion: sibling Linears that read the same input run as one matmul (q/k/v, gate/up).

Decode at small batch is a chain of skinny matmuls, each a kernel launch plus a pass over its weight; one
(K, Nq + Nk + Nv) matmul instead of three reads the input once and launches once. The model's own forward
still calls `q_proj(x)`, `k_proj(x)`, `v_proj(x)` in turn, so each sibling is replaced by a `FusedSlice`
that shares one `FusedLinearGroup`: the first call computes the fused product for `x`, the others return
their column slice of it for the same `x` (same tensor object), and the group forgets it after the last
slice. This keeps the Hugging Face forward untouched, so every architecture whose siblings read one input
gets the fusion. Limits: dense float Linears only (quantized layers keep their own kernels); the group
must be called in the usual order within one forward (a call with another tensor recomputes: correct,
just unfused).
"""

from __future__ import annotations

import torch
from torch import nn

# Sibling groups per module type, tried on every submodule that has all the names.
DEFAULT_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedLinearGroup(nn.Module):
    """One Linear holding the concatenated weights of its members; remembers its last output."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)  # (sum N, K)
        has_bias = any(lin.bias is not None for lin in linears)
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            if has_bias:
                bias = [lin.bias.detach() if lin.bias is not None else torch.zeros(lin.out_features, device=weight.device, dtype=weight.dtype) for lin in linears]
                self.linear.bias.copy_(torch.cat(bias))
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
            if not all(type(m) is nn.Linear for m in members):
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
    from optforge.errors import ArtifactError

    for fusion in fusions:
        if fusion.get("kind") != "sibling_linears":
            raise ArtifactError(f"unknown module fusion {fusion!r} in optforge.json; this optforge knows 'sibling_linears' (upgrade optforge?)")
        fuse_sibling_linears(model, tuple(tuple(group) for group in fusion["groups"]))
    return model
