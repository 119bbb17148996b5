"""The math of unstructured and N:M sparsity: which weights to zero, and SparseGPT's weight update.

Scores are "importance" (higher is kept). Masks are boolean with True where a weight is pruned (zeroed).
SparseGPT follows Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot" (2023): columns are pruned left to right in blocks, and each pruned weight's error is spread over
the not-yet-processed columns through the inverse Hessian of the layer's inputs (optimal brain surgeon).
"""

from __future__ import annotations

import math

import torch


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N kept, M group size), e.g. '2:4' -> (2, 4)."""
    if pattern == "unstructured":
        return None
    keep, _, group = pattern.partition(":")
    if not (keep.isdigit() and group.isdigit()) or not 0 < int(keep) < int(group):
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'), found {pattern!r}")
    return int(keep), int(group)


def prune_mask(scores: torch.Tensor, *, sparsity: float, nm: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """(out, in) scores -> (out, in) bool mask of pruned weights.

    N:M keeps the N highest of every M consecutive input columns in each row (sparsity is then 1 - N/M);
    otherwise the lowest `sparsity` fraction is pruned in each row (`per_row`) or over the whole matrix.
    """
    if nm is not None:
        keep, group = nm
        rows, cols = scores.shape
        if cols % group:
            raise ValueError(f"{cols} input features are not a multiple of the N:M group size {group}")
        grouped = scores.reshape(rows, cols // group, group)
        low = grouped.topk(group - keep, dim=-1, largest=False).indices
        mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, low, True)
        return mask.reshape(rows, cols)
    if per_row:
        k = int(scores.shape[1] * sparsity)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        if k:
            mask.scatter_(1, scores.topk(k, dim=1, largest=False).indices, True)
        return mask
    k = int(scores.numel() * sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[scores.flatten().topk(k, largest=False).indices] = True
    return mask.view_as(scores)


def global_threshold(scores: list[torch.Tensor], sparsity: float) -> float:
    """The score below which `sparsity` of all weights (across every matrix) fall."""
    flat = torch.cat([s.flatten() for s in scores])
    k = int(flat.numel() * sparsity)
    return float(flat.kthvalue(max(k, 1)).values) if k else -math.inf


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float, nm: tuple[int, int] | None, block_size: int = 128, damp: float = 0.01) -> torch.Tensor:
    """Return the pruned (out, in) weight. `hessian` is X^T X (in, in) summed over calibration tokens."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, device=h.device)
    # Upper Cholesky factor of H^-1: row i holds the OBS update for column i over columns i.. (Frantar et al.).
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    group = nm[1] if nm else None
    if group and block_size % group:
        block_size = group * max(1, block_size // group)
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        w_blk = w[:, start:stop].clone()
        hinv_blk = hinv[start:stop, start:stop]
        err_blk = torch.zeros_like(w_blk)
        diag = torch.diag(hinv_blk)
        mask_blk = None if nm else prune_mask(w_blk**2 / diag**2, sparsity=sparsity, nm=None, per_row=True)
        for i in range(stop - start):
            if nm and i % group == 0:
                scores = w_blk[:, i : i + group] ** 2 / diag[i : i + group] ** 2
                mask_grp = prune_mask(scores, sparsity=0.0, nm=nm, per_row=True)
            col = w_blk[:, i]
            pruned = mask_grp[:, i % group] if nm else mask_blk[:, i]
            q = torch.where(pruned, torch.zeros_like(col), col)
            err = (col - q) / hinv_blk[i, i]
            w_blk[:, i:] -= err.unsqueeze(1) * hinv_blk[i, i:].unsqueeze(0)
            w_blk[:, i] = q
            err_blk[:, i] = err
        w[:, start:stop] = w_blk
        w[:, stop:] -= err_blk @ hinv[start:stop, stop:]
    return w.to(weight.dtype)
