"""Where calibration computes and keeps its data: decoder layers onloaded one at a time, activations in tiers.

A calibrated pass loads its model on the host; `calibrate` (passes/calibration.py) moves one decoder layer at a
time to the build's device and back (`LayerMover`: on CUDA the next layer is copied on a side stream while the
current one calibrates), so the device holds one or two layers, never the model. The hidden states that pass
from layer to layer live in an `Activations` store: on the device while they fit what `--max-device-memory`
leaves after the layers and the algorithm's working memory, then on the host while they fit what
`--max-host-memory` leaves after the process as it stands, then in safetensors files in a spill folder inside
the pass's resume folder in the cache (removed with it). Where a budget cannot hold even one layer's work, the
build stops with exit 2 and the budget that would do. Under a host budget each finished layer, already in its
output form, is also parked: written to a file in the resume folder and kept as mapped views of it (`park`), so
the process's own memory does not grow with the layers done.

On the CPU (`--device cpu`) the host is the device: nothing moves, and only the host budget applies.
"""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from optforge.errors import UserInputError
from optforge.resources import MemoryBudget, anonymous_bytes, gib

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where a calibrated pass computes (`device`), what it may hold (`budget`), where activations that fit
    neither go (`spill_dir`, None: nowhere, so a host budget too small for them is an error) and where finished
    layers are parked (`park_dir`, None: they stay in memory; see `park`)."""

    device: torch.device
    budget: MemoryBudget = MemoryBudget()
    spill_dir: Path | None = None
    park_dir: Path | None = None

    @classmethod
    def of(cls, device: str | torch.device = "cpu", budget: MemoryBudget | None = None, spill_dir: Path | None = None,
           park_dir: Path | None = None) -> "Placement":
        return cls(torch.device(device), budget or MemoryBudget(), spill_dir, park_dir)

    def for_rank(self, rank: int) -> "Placement":
        """The placement of one of several processes: spill and park folders of its own."""
        return Placement(self.device, self.budget, *(None if d is None else d / f"rank{rank}" for d in (self.spill_dir, self.park_dir)))

    @property
    def onloads(self) -> bool:
        return self.device.type != "cpu"


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


# ------------------------------------------------------------------------------------------ activations


class Tiers:
    """The bytes each tier may still take, shared by the stores of one calibration (a layer's inputs and
    outputs live at once)."""

    def __init__(self, device: torch.device, device_free: int | None, host_free: int | None, spill_dir: Path | None):
        self.device, self.spill_dir = device, spill_dir
        self.free = {"device": device_free, "host": host_free}
        self.counts = {"device": 0, "host": 0, "disk": 0}

    def take(self, nbytes: int) -> str:
        """The tier a tensor of `nbytes` goes to (device, then host, then disk), its bytes counted there."""
        for tier in ("device", "host"):
            free = self.free[tier]
            if free is None or free >= nbytes:
                if free is not None:
                    self.free[tier] = free - nbytes
                self.counts[tier] += 1
                return tier
        if self.spill_dir is None:
            raise UserInputError(f"calibration activations do not fit --max-host-memory (a batch of {gib(nbytes)} is over what is left) and there is no spill folder; raise --max-host-memory")
        self.counts["disk"] += 1
        return "disk"

    def give(self, tier: str, nbytes: int) -> None:
        if tier != "disk" and self.free[tier] is not None:
            self.free[tier] += nbytes


class Activations:
    """One layer's hidden states, one (B, T, D) tensor per batch, each where `tiers` puts it; iterating yields
    them on the compute device."""

    _serial = 0

    def __init__(self, tiers: Tiers):
        self.tiers = tiers
        self.items: list[tuple[str, int, torch.Tensor | Path]] = []
        Activations._serial += 1
        self.name = f"a{Activations._serial}"

    def append(self, hidden: torch.Tensor) -> None:
        nbytes = hidden.numel() * hidden.element_size()
        tier = self.tiers.take(nbytes)
        if tier == "device":
            self.items.append((tier, nbytes, hidden))
        elif tier == "host":
            self.items.append((tier, nbytes, hidden.to("cpu")))
        else:
            from safetensors.torch import save_file

            self.tiers.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self.tiers.spill_dir / f"{self.name}-{len(self.items)}.safetensors"
            save_file({"hidden": hidden.contiguous().cpu()}, path)
            self.items.append((tier, nbytes, path))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        tier, _, value = self.items[i]
        if tier == "disk":
            from safetensors.torch import load_file

            return load_file(value, device=str(self.tiers.device))["hidden"]
        return value.to(self.tiers.device, non_blocking=True)

    def __iter__(self):
        return (self[i] for i in range(len(self.items)))

    def release(self) -> None:
        """Give the store's bytes back to its tiers and delete its files."""
        for tier, nbytes, value in self.items:
            self.tiers.give(tier, nbytes)
            if tier == "disk":
                value.unlink(missing_ok=True)
        self.items = []


def activation_tiers(placement: Placement, layers: nn.ModuleList, batches: list[torch.Tensor], hidden_size: int, dtype: torch.dtype, working: int, pass_name: str) -> Tiers:
    """Split the budgets: the device keeps (budget - one or two layers - the algorithm's working memory) for
    activations, the host (budget - what the process holds now). Exit 2 where the device budget cannot hold
    one layer's work, naming the budget that would."""
    element = torch.finfo(dtype).bits // 8
    batch = max(b.numel() for b in batches) * hidden_size * element
    layer = max(module_bytes(m) for m in layers)
    resident = layer * (2 if placement.device.type == "cuda" else 1)  # the next layer prefetched beside the current
    device_free = host_free = None
    budget = placement.budget
    if placement.onloads and budget.device is not None:
        need = resident + working + 2 * batch  # one batch in and out, beside the layers and the algorithm
        if budget.device < need:
            raise UserInputError(
                f"--max-device-memory {gib(budget.device)} cannot hold one decoder layer's calibration with {pass_name}: it needs about {gib(need)} "
                f"(layer weights {gib(layer)}{' x 2, the next one prefetched' if resident > layer else ''}, the algorithm's working memory {gib(working)}, "
                f"one batch of activations in and out {gib(2 * batch)}); set --max-device-memory {_round_up(need)} or more"
            )
        device_free = budget.device - need
    if budget.host is not None:
        now = anonymous_bytes()  # the model's mapped file pages are not the process's to budget: the kernel drops them
        need = now + (0 if placement.onloads else working + 2 * batch)
        if budget.host < need:
            held = "the model and the process" if not placement.onloads else "the model on the host and the process"
            raise UserInputError(f"--max-host-memory {gib(budget.host)} is below what {held} already take ({gib(now)}){'' if placement.onloads else ' plus one layer of calibration work'}; "
                                 f"set --max-host-memory {_round_up(need + 2 * batch)} or more")
        host_free = budget.host - need
    if not placement.onloads:  # the host is the device: one budget, then disk
        device_free, host_free = host_free, None if host_free is None else 0
    return Tiers(placement.device, device_free, host_free, placement.spill_dir)


def _round_up(nbytes: int) -> str:
    return f"{-(-nbytes // 2**30)}GiB"


def clear_spill(placement: Placement) -> None:
    if placement.spill_dir is not None and placement.spill_dir.exists():
        shutil.rmtree(placement.spill_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ layers


class LayerMover:
    """Decoder layers to the compute device one at a time and back home; on CUDA, layer i + 1 is copied on a side
    stream (from a helper thread) while layer i computes. `close` returns prefetched layers unfinished: not parked."""

    def __init__(self, layers: nn.ModuleList, placement: Placement, home: torch.device):
        self.layers, self.device, self.home, self.park_dir = layers, placement.device, home, placement.park_dir
        self.moves = placement.device != home
        self.stream = torch.cuda.Stream(placement.device) if self.moves and placement.device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="optforge-prefetch") if self.stream is not None else None
        self.pending: dict[int, Future] = {}

    def _copy(self, index: int) -> None:
        with torch.cuda.stream(self.stream):
            self.layers[index].to(self.device, non_blocking=True)

    def fetch(self, index: int) -> nn.Module:
        """Layer `index` on the compute device (waiting for its prefetch), and the next one's prefetch started."""
        layer = self.layers[index]
        if not self.moves:
            return layer
        if index in self.pending:
            self.pending.pop(index).result()
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        else:
            layer.to(self.device)
        if self.pool is not None and index + 1 < len(self.layers):
            self.pending[index + 1] = self.pool.submit(self._copy, index + 1)
        return layer

    def release(self, index: int) -> None:
        """Layer `index` back home, finished; parked there where the placement says (`park`)."""
        if self.moves:
            self.layers[index].to(self.home)
        if self.park_dir is not None:
            park(self.layers[index], self.park_dir, index)

    def close(self) -> None:
        for index, future in self.pending.items():
            future.result()
            self.layers[index].to(self.home)
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown()


def park(layer: nn.Module, folder: Path, index: int) -> None:
    """Write a finished layer's host tensors to `folder` and put copy-on-write mapped views of them in their place:
    the host keeps the layer as clean file pages the kernel may drop, not as the process's own memory (what
    `--max-host-memory` bounds), and the pass writes its output from those views."""
    from optforge.tensor_files import mmap_safetensors, write_safetensors

    owners: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in (*layer.named_parameters(), *layer.named_buffers()):
        if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            owners[name] = tensor
    folder.mkdir(parents=True, exist_ok=True)
    path, staging = folder / f"layer{index}.safetensors", folder / f".layer{index}.safetensors"
    write_safetensors(staging, {name: t.detach().contiguous() for name, t in owners.items()})
    staging.replace(path)
    for name, view in mmap_safetensors(path).items():
        owners[name].data = view


def outer_modules(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """The decoder's own modules around the layers (embeddings, rotary embedding, final norm): what the
    capture runs on the device besides the layers."""
    inner = model.model
    return [m for name, m in inner.named_children() if m is not layers]
