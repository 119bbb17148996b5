"""The grouped expert kernel (runtime/kernels/moe.py) against the per-expert loop.

Runs on CUDA, or on the CPU under Triton's interpreter (`TRITON_INTERPRET=1` with Triton installed); the tests that
put `LinearExperts` itself on the GPU need CUDA."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED), reason="needs CUDA, or Triton's interpreter (TRITON_INTERPRET=1)")]


def _loop(x, idx, w, gate_up, down):
    """The reference: per token and slot, weight * down(silu(gate x) * up x), in float64."""
    x, gate_up, down, w = x.double(), gate_up.double(), down.double(), w.double()
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            g, u = (gate_up[idx[n, j]] @ x[n]).chunk(2)
            out[n] += w[n, j] * (down[idx[n, j]] @ (nn.functional.silu(g) * u))
    return out


def _problem(tokens: int, experts: int, k: int, hidden: int, inter: int, seed: int = 0, skew: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    down = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    logits = torch.randn(tokens, experts, generator=g) + (torch.arange(experts) < 3) * 4.0 * skew  # skew: most go to 3 experts
    w, idx = logits.softmax(-1).topk(k)
    return [t.to(DEVICE) for t in (x, idx, w, gate_up, down)]


@pytest.mark.parametrize("tokens,experts,k,hidden,inter,skew", [
    (37, 8, 2, 64, 48, False),  # an intermediate width that is no multiple of the block
    (1, 16, 4, 64, 32, False),  # batch-1 decode: most experts idle
    (70, 16, 1, 32, 64, True),  # top-1, routing skewed to 3 experts, others empty
])
def test_grouped_kernel_equals_the_per_expert_loop(tokens, experts, k, hidden, inter, skew):
    from optforge.runtime.kernels.moe import grouped_mlp

    x, idx, w, gate_up, down = _problem(tokens, experts, k, hidden, inter, skew=skew)
    got = grouped_mlp(x, idx, w, gate_up, down)
    want = _loop(x.cpu(), idx.cpu(), w.cpu(), gate_up.cpu(), down.cpu())
    tol = 1e-5 if DEVICE == "cpu" else 2e-2  # CUDA: tf32 tensor cores in tl.dot
    assert got.shape == x.shape and (got.cpu().double() - want).abs().max() <= tol * want.abs().max()


def test_align_places_every_pair_once_in_blocks_of_one_expert():
    from optforge.runtime.kernels.moe import align

    _, idx, _, _, _ = _problem(45, 8, 2, 16, 16, skew=True)
    pairs, block_expert = align(idx, 8, 16)
    pairs, block_expert, flat = pairs.cpu(), block_expert.cpu(), idx.cpu().reshape(-1)
    assert sorted(pairs[pairs >= 0].tolist()) == list(range(flat.numel()))
    for b, expert in enumerate(block_expert.tolist()):
        members = pairs[b * 16 : (b + 1) * 16]
        members = members[members >= 0]
        assert all(flat[m] == expert for m in members.tolist())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="LinearExperts takes the kernel on CUDA only")
def test_linear_experts_on_cuda_take_the_kernel_and_match_the_cpu_loop():
    from optforge.formats.experts import ExpertMLP, LinearExperts

    torch.manual_seed(0)
    act = nn.SiLU()
    experts = LinearExperts([ExpertMLP(("gate_proj", "up_proj", "down_proj"), 64, 32, act) for _ in range(8)])
    x = torch.randn(40, 64)
    w, idx = torch.randn(40, 8).softmax(-1).topk(2)
    want = experts(x, idx, w)
    experts.cuda()
    got = experts(x.cuda(), idx.cuda(), w.cuda())
    gate_up, down = experts.stacked()
    assert experts[3].up_proj.weight.data_ptr() == gate_up[3, 32:].data_ptr() and experts[5].down_proj.weight.data_ptr() == down[5].data_ptr()
    assert (got.cpu() - want).abs().max() <= 2e-2 * want.abs().max()
