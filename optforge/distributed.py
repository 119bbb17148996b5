"""Builds over several processes through torch.distributed, launched by torchrun.

`torchrun --nproc-per-node N -m optforge build RECIPE` (or `optforge build --nproc N`, which runs exactly that)
starts N copies of the build. Rank 0 leads: it converts the source, reads and writes the cache, runs the evals
and gates, and publishes. Every rank runs the calibrated passes together: each calibrates on its share of the
calibration batches and the statistics the algorithms accumulate (GPTQ's Hessians, activation ranges, AWQ's
and SmoothQuant's per-channel statistics and row samples) are all-reduced before every rank applies the same
change to the layer (passes/calibration.py). The others then read rank 0's cache entry as the next pass's input.
The process group is gloo on the CPU and NCCL on GPUs (rank r computes on cuda:LOCAL_RANK).

One process (no torchrun): every function here is the identity or a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any

import torch

from optforge.errors import UserInputError


def world_size() -> int:
    return torch.distributed.get_world_size() if _active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if _active() else 0


def is_leader() -> bool:
    return rank() == 0


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def launched_size() -> int:
    """How many processes torchrun (or another launcher setting WORLD_SIZE) started this one among; 1 outside."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether this process is one of several that a launcher started."""
    return launched_size() > 1


def init(device: str) -> str:
    """Join the process group torchrun set up (gloo on the CPU, NCCL on CUDA) and return this rank's device
    (`cuda` becomes `cuda:LOCAL_RANK`). A single process returns `device` unchanged."""
    if not launched():
        return device
    if not _active():
        cuda = device.startswith("cuda")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise UserInputError(f"rank {os.environ.get('RANK')} wants cuda:{local}, but this machine has {torch.cuda.device_count()} GPU(s): lower --nproc-per-node")
            torch.cuda.set_device(local)
        # Ranks other than 0 wait while it measures and gates (evals can take hours): a long timeout, not the 30-minute default.
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=24))
    if device.startswith("cuda") and ":" not in device:
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def barrier() -> None:
    if _active():
        torch.distributed.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (pickled by torch.distributed: for the build's own small records only)."""
    if not _active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: list) -> list:
    """This rank's share of `items` (every world_size-th, from its rank)."""
    return items[rank() :: world_size()] if _active() else items


def _comm_device(t: torch.Tensor) -> torch.device:
    backend = torch.distributed.get_backend()
    return t.device if backend == "nccl" else torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`t` reduced over the ranks ("sum", "max" or "min"), on t's device and dtype; the same bits on every rank."""
    if not _active():
        return t
    work = t.to(_comm_device(t), copy=True)
    ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX, "min": torch.distributed.ReduceOp.MIN}
    torch.distributed.all_reduce(work, op=ops[op])
    return work.to(t.device)


def all_reduce_float(value: float, op: str = "max") -> float:
    return float(all_reduce(torch.tensor([value], dtype=torch.float64), op)[0]) if _active() else value


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The ranks' row blocks (n_r, ...) concatenated in rank order (n_r may differ between ranks)."""
    if not _active():
        return t
    device = _comm_device(t)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    torch.distributed.all_gather(sizes, torch.tensor([t.shape[0]], device=device))
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t.to(device)
    blocks = [torch.empty_like(padded) for _ in range(world_size())]
    torch.distributed.all_gather(blocks, padded)
    return torch.cat([b[: int(s.item())] for b, s in zip(blocks, sizes)]).to(t.device)


@contextlib.contextmanager
def leader_first():
    """Rank 0 runs the block first (e.g. converting the source into the cache); the others run it after."""
    if is_leader():
        yield
        barrier()
    else:
        barrier()
        yield
