"""Mixture-of-experts experts as Linear modules, one (gate, up, down) MLP per expert.

transformers 5.x holds a sparse block's experts as two 3D parameters (`experts.gate_up_proj` (E, 2I, H),
`experts.down_proj` (E, H, I)) and converts the per-expert tensors of Hub checkpoints into them at load time.
optforge's loader turns them back into one small MLP of `nn.Linear`s per expert (`unfuse_experts`), so:

- every pass that works on Linears (RTN, GPTQ, AWQ, SmoothQuant, FP8, pruning) handles expert weights as it
  handles any other Linear, with the router (`mlp.gate`) left out by `passes.targets`;
- artifacts store experts under the Hub's per-expert names, which transformers converts on load and vLLM's
  MoE loaders read (`model.layers.N.mlp.experts.E.gate_proj.weight_packed` for Qwen3-MoE; `w1`/`w3`/`w2` for
  Mixtral, whose on-disk block is `block_sparse_moe`: `disk_key`/`memory_key` translate);
- calibration can make every expert see every token (`see_all_tokens`): a router sends a calibration set's tokens to
  few experts, and an expert with no tokens has no statistics, the silent failure of calibrating MoE models.
  The block's output stays the routed one; only what the Linears' input hooks see changes.

`LinearExperts.forward` takes what HF's experts module takes (tokens (N, H), top-k expert ids (N, k) and their
weights (N, k)) and sums the same products in the same expert order, so it is a drop-in inside HF's block. On CUDA,
float SiLU experts run as two grouped Triton launches over the tokens sorted by expert (runtime/kernels/moe.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from typing import Iterator

import torch
from torch import nn

# model_type -> the Hub's names of an expert's (gate, up, down) Linears.
EXPERT_LINEARS: dict[str, tuple[str, str, str]] = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}
# model_type -> (name of the sparse block in memory, its name in Hub checkpoints), where they differ (every
# Mixtral layer's MLP is a sparse block).
BLOCK_ON_DISK: dict[str, tuple[str, str]] = {"mixtral": (".mlp.", ".block_sparse_moe.")}
EXPERTS = re.compile(r"(^|\.)experts$")  # the module that holds a sparse block's experts


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), its Linears under the model family's names."""

    def __init__(self, names: tuple[str, str, str], hidden: int, intermediate: int, act: nn.Module, **factory):
        super().__init__()
        self.names = names
        gate, up, down = names
        self.add_module(gate, nn.Linear(hidden, intermediate, bias=False, **factory))
        self.add_module(up, nn.Linear(hidden, intermediate, bias=False, **factory))
        self.add_module(down, nn.Linear(intermediate, hidden, bias=False, **factory))
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class LinearExperts(nn.Module):
    """A sparse block's experts as `ExpertMLP` children named "0" .. "E-1" (HF's experts module's interface)."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__()
        for i, expert in enumerate(experts):
            self.add_module(str(i), expert)
        self.num_experts = len(experts)
        self.see_all = False  # calibration: every expert runs on every token (the output stays the routed one)
        self.routed: torch.Tensor | None = None  # with `count_tokens`: tokens routed to each expert, summed

    def __getitem__(self, index: int) -> ExpertMLP:
        return getattr(self, str(index))

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if hidden.is_cuda and not self.see_all and self.routed is None:
            stacks = self.stacked()
            if stacks is not None:  # float SiLU experts: two grouped launches (runtime/kernels/moe.py)
                from optforge.runtime.kernels.moe import grouped_mlp

                return grouped_mlp(hidden, top_k_index, top_k_weights, *stacks)
        out = torch.zeros_like(hidden)
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs sorted by expert, tokens ascending
        tokens = order // k
        weights = top_k_weights.reshape(-1)[order]
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        if self.routed is not None:
            self.routed += torch.tensor(counts[: self.num_experts])
        start = 0
        for e in range(self.num_experts):
            n = counts[e]
            rows = tokens[start : start + n]
            if self.see_all:
                y = self[e](hidden)[rows]
            elif n:
                y = self[e](hidden[rows])
            else:
                continue
            out.index_add_(0, rows, (y * weights[start : start + n, None]).to(out.dtype))
            start += n
        return out

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gate|up (E, 2I, H), down (E, H, I)) of float SiLU experts on CUDA with Triton, made once: the experts'
        Linears then hold views into them (no second copy). None where the loop must run (quantized experts, another
        activation, no Triton)."""
        first = self[0]
        gate = getattr(first, first.names[0])
        cached = getattr(self, "_stacks", None)
        if cached is not None and gate.weight.data_ptr() == cached[0].data_ptr():
            return cached
        experts = [self[e] for e in range(self.num_experts)]
        plain = all(type(getattr(x, n)) is nn.Linear for x in experts for n in x.names)
        if not plain or type(first.act_fn).__name__ not in ("SiLU", "SiLUActivation") or importlib.util.find_spec("triton") is None:
            return None
        inter = gate.out_features
        with torch.no_grad():
            gate_up = torch.stack([torch.cat([getattr(x, x.names[0]).weight, getattr(x, x.names[1]).weight]) for x in experts])
            downs = torch.stack([getattr(x, x.names[2]).weight for x in experts])
        for e, x in enumerate(experts):
            for n, view in zip(x.names, (gate_up[e, :inter], gate_up[e, inter:], downs[e])):
                getattr(x, n).weight = nn.Parameter(view, requires_grad=False)
        self._stacks = (gate_up, downs)
        return self._stacks


def _fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if EXPERTS.search(name) and isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)]


def unfuse_experts(model: nn.Module, *, copy: bool = True) -> int:
    """Replace each HF experts module (3D `gate_up_proj`/`down_proj`) of a `EXPERT_LINEARS` family with
    `LinearExperts`; returns how many were replaced. `copy=False` (a skeleton whose weights come from a file
    next) makes the Linears on the meta device, without copying or allocating anything."""
    names = EXPERT_LINEARS.get(getattr(model.config, "model_type", ""))
    if names is None:
        return 0
    found = _fused_experts(model)
    for qualified, fused in found:
        gate_up, down = fused.gate_up_proj, fused.down_proj
        num, two_i, hidden = gate_up.shape
        inter = two_i // 2
        factory = {"dtype": gate_up.dtype, "device": gate_up.device if copy else "meta"}
        experts = []
        for e in range(num):
            expert = ExpertMLP(names, hidden, inter, fused.act_fn, **factory)
            if copy:
                with torch.no_grad():
                    getattr(expert, names[0]).weight.copy_(gate_up[e, :inter])
                    getattr(expert, names[1]).weight.copy_(gate_up[e, inter:])
                    getattr(expert, names[2]).weight.copy_(down[e])
            experts.append(expert)
        parent_name, _, child = qualified.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LinearExperts(experts))
        del fused, gate_up, down
    return len(found)


def linear_experts(model: nn.Module) -> dict[str, LinearExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearExperts)}


@contextlib.contextmanager
def see_all_tokens(module: nn.Module) -> Iterator[None]:
    """Inside: every `LinearExperts` under `module` runs each expert on every token (for the input hooks of
    calibration; outputs unchanged)."""
    experts = [m for m in module.modules() if isinstance(m, LinearExperts)]
    for m in experts:
        m.see_all = True
    try:
        yield
    finally:
        for m in experts:
            m.see_all = False


@contextlib.contextmanager
def count_tokens(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Inside: each `LinearExperts` under `module` sums the tokens its router sends to each expert; the dict
    yielded maps their qualified names (relative to `module`) to those counts (int64 (E,))."""
    experts = {name: m for name, m in module.named_modules() if isinstance(m, LinearExperts)}
    counts = {}
    for name, m in experts.items():
        m.routed = counts[name] = torch.zeros(m.num_experts, dtype=torch.int64)
    try:
        yield counts
    finally:
        for m in experts.values():
            m.routed = None


def disk_key(model_type: str, key: str) -> str:
    """A tensor or module name as the Hub's checkpoints of `model_type` spell it (Mixtral: `block_sparse_moe`)."""
    memory, disk = BLOCK_ON_DISK.get(model_type, ("", ""))
    return key.replace(memory, disk) if memory else key


def memory_key(model_type: str, key: str) -> str:
    """The inverse of `disk_key`."""
    memory, disk = BLOCK_ON_DISK.get(model_type, ("", ""))
    return key.replace(disk, memory) if disk else key
