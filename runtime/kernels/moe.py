"""Mixture-of-experts MLP on CUDA in two grouped Triton launches, tokens sorted by expert.

HF's experts module (and `LinearExperts` on the CPU) loops over experts: per expert a gather, three GEMMs and a
scatter, about ten launches per expert and a host sync for the routing. Here the (token, slot) pairs are sorted
by expert and each expert's run padded to a multiple of `BLOCK_M` (`align`, a few torch ops, no sync); then

1. `_gate_up_kernel`: each program owns BLOCK_M pairs of one expert and BLOCK_N intermediate columns: it gathers
   the pairs' token rows, multiplies them by the expert's gate and up rows (two accumulators over the hidden
   dimension) and stores act(gate) * up (pairs, I);
2. `_down_kernel`: the same blocks times the expert's down weight, scaled by each pair's routing weight, stored at
   the pair's own row (token * k + slot), so summing the k rows of each token gives the block's output without
   atomics (deterministic).

Weights are the experts' float Linears stacked once into (E, 2I, H) and (E, H, I) (`stack_experts`; the Linears
then view the stacks, so memory is not doubled). Quantized experts keep the loop. The activation is SiLU
(Qwen3-MoE, Mixtral).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, out_ptr, pair_ptr, block_expert_ptr, H: tl.constexpr, I: tl.constexpr, K_TOP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ptr + offs_m)  # -1: padding
    valid = pair >= 0
    if tl.max(valid.to(tl.int32), axis=0) == 0:
        return  # a block past the experts' padded runs (the list is sized for the worst case)
    token = tl.where(valid, pair // K_TOP, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < I
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w_ptr + expert.to(tl.int64) * (2 * I * H)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        x = tl.load(x_ptr + token[:, None] * H + offs_k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(w_base + offs_n[None, :] * H + offs_k[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        wu = tl.load(w_base + (offs_n[None, :] + I) * H + offs_k[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        gate = tl.dot(x, wg, gate)
        up = tl.dot(x, wu, up)
    h = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + offs_m[:, None] * I + offs_n[None, :], h.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, weight_ptr, out_ptr, pair_ptr, block_expert_ptr, H: tl.constexpr, I: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ptr + offs_m)
    valid = pair >= 0
    if tl.max(valid.to(tl.int32), axis=0) == 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w_ptr + expert.to(tl.int64) * (H * I)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < I
        h = tl.load(h_ptr + offs_m[:, None] * I + offs_k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + offs_n[None, :] * I + offs_k[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(h, w, acc)
    routing = tl.load(weight_ptr + tl.where(valid, pair, 0), mask=valid, other=0.0).to(tl.float32)
    acc = acc * routing[:, None]
    rows = tl.where(valid, pair, 0)
    tl.store(out_ptr + rows[:, None] * H + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


def align(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair ids sorted by expert, each expert's run padded with -1 to a multiple of block_m; the expert of every
    block of block_m). Sized for the worst case (every expert padded), so no value is read back to the host."""
    flat = top_k_index.reshape(-1)
    pairs = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))  # bincount reads its max back
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded  # where each expert's run begins in the padded list
    first = torch.cumsum(counts, 0) - counts  # where it begins in `order`
    rank = torch.arange(pairs, device=flat.device) - first[flat[order]]
    capacity = (pairs + num_experts * (block_m - 1) + block_m - 1) // block_m * block_m
    sorted_pairs = torch.full((capacity,), -1, dtype=torch.int64, device=flat.device)
    sorted_pairs[starts[flat[order]] + rank] = order
    block_expert = torch.searchsorted(torch.cumsum(padded, 0), torch.arange(0, capacity, block_m, device=flat.device), right=True)
    return sorted_pairs, block_expert.clamp(max=num_experts - 1)


def grouped_mlp(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                *, block_m: int = 16, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """sum over a token's k experts of weight * down_e(silu(gate_e x) * up_e x): hidden (N, H), top_k_index and
    top_k_weights (N, k), gate_up (E, 2I, H), down (E, H, I) -> (N, H) in hidden's dtype."""
    n, hsize = hidden.shape
    k = top_k_index.shape[1]
    num_experts, two_i, _ = gate_up.shape
    inter = two_i // 2
    sorted_pairs, block_expert = align(top_k_index, num_experts, block_m)
    blocks = block_expert.numel()
    h = torch.empty((sorted_pairs.numel(), inter), dtype=hidden.dtype, device=hidden.device)
    _gate_up_kernel[(blocks, triton.cdiv(inter, block_n))](hidden.contiguous(), gate_up, h, sorted_pairs, block_expert, H=hsize, I=inter, K_TOP=k,
                                                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    # h is indexed by position in the sorted list; the down kernel reads it the same way and writes by pair.
    out = torch.zeros((n * k, hsize), dtype=hidden.dtype, device=hidden.device)
    weights = top_k_weights.reshape(-1).contiguous()
    _down_kernel[(blocks, triton.cdiv(hsize, block_n))](h, down, weights, out, sorted_pairs, block_expert, H=hsize, I=inter,
                                                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out.view(n, k, hsize).sum(1)
