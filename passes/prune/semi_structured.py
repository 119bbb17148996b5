"""Run 2:4-pruned Linear weights through PyTorch's semi-structured sparse CUDA kernels.

`torch.sparse.to_sparse_semi_structured` compresses a 2:4 matrix to its kept half plus 2-bit indices, and
`F.linear` on such a weight dispatches to cuSPARSELt (or CUTLASS) sparse tensor-core GEMMs: Ampere or newer,
fp16/bf16, both dimensions multiples of 64. On CPU there is no such kernel: a 2:4 checkpoint runs densely with
its zeros, and `semi_structured_available()` says why not. Checkpoints stay dense-with-zeros on disk (what
plain `transformers` loads); the compression happens at load time on the GPU.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def semi_structured_available(device: torch.device | str = "cuda") -> tuple[bool, str]:
    """(True, "") when 2:4 sparse kernels can run on `device`, else (False, the reason)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "no CUDA device: 2:4 weights run as dense matrices with zeros"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"compute capability {major}.x: semi-structured sparse kernels need 8.0 (Ampere) or newer"
    return True, ""


def is_two_four(weight: torch.Tensor) -> bool:
    """Every group of 4 consecutive input weights in each row has at least 2 zeros."""
    rows, cols = weight.shape
    return cols % 4 == 0 and bool(((weight == 0).reshape(rows, cols // 4, 4).sum(-1) >= 2).all())


@torch.no_grad()
def sparsify_linears(model: nn.Module) -> list[str]:
    """Swap the weight of every 2:4 Linear (fp16/bf16, on CUDA, dims multiples of 64) for its compressed form."""
    from torch.sparse import to_sparse_semi_structured

    ok, why = semi_structured_available(next(model.parameters()).device)
    if not ok:
        raise RuntimeError(why)
    done = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or module.weight.dtype not in (torch.float16, torch.bfloat16):
            continue
        w = module.weight
        if w.shape[0] % 64 or w.shape[1] % 64 or not is_two_four(w):
            continue
        module.weight = nn.Parameter(to_sparse_semi_structured(w.detach()), requires_grad=False)
        done.append(name)
    log.info("2:4 semi-structured kernels on %d Linear layers", len(done))
    return done
