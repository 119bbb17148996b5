"""Checkpoints of finished decoder layers: a calibrated pass killed at layer 60 of 80 resumes at layer 60.

`calibrate` (passes/calibration.py) saves, after each layer, what that layer left behind: the layer's tensors
that the algorithm's `apply` changed (found bit for bit against a copy taken before `apply`) and the
algorithm's own results for the layer (`LayerAlgorithm.layer_results`: GPTQ's integers and scales, an observed
range, the state of a seeded generator). One safetensors file per layer, written atomically, and `index.json`
with each file's sha256 and what the folder belongs to (pass, algorithm, layer and batch counts, device type).
A file that is missing or no longer matches its sha256 is not trusted: that layer and every later one are
calibrated again.

The folder is the pipeline's `PassContext.resume_dir`, `<cache>/resume/<pass cache key>/`: the key hashes
everything that decides the pass's output (input digest, config, calibration data, dtype), so checkpoints are
only reused by a build that computes the same layers; the cache deletes the folder once the pass's output is an
entry. Activations are not stored: on resume each finished layer runs forward again with its checkpoint applied
(no observing, no solving), which hands the next layer bit-identical inputs and keeps the folder free of
num_batches x B x T x hidden per layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
from pathlib import Path

import torch

from optforge.durable import remove_stale_staging, write_bytes_atomic
from optforge.hashing import sha256_file

log = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT = 1
_LAYER, _RESULT = "layer/", "result/"
# Test hook, inert unless set: the process SIGKILLs itself right after the checkpoint of this layer index is
# on disk, so tests can interrupt a real build at a known point (tests/passes/test_resume.py).
TEST_KILL_AFTER_LAYER = "OPTFORGE_TEST_KILL_AFTER_LAYER"


class LayerCheckpoints:
    """The checkpoints of one calibrated pass run, in `folder`; `identity` must match for any to be reused."""

    def __init__(self, folder: Path, identity: dict, writer: bool = True):
        self.folder, self.identity, self.writer = Path(folder), identity, writer
        self.layers: dict[int, dict] = {}  # layer index -> {"file", "sha256"}
        self._reusable = True  # False after the first layer that had to be calibrated again

    @classmethod
    def open(cls, folder: Path, identity: dict, *, writer: bool = True) -> "LayerCheckpoints":
        """The checkpoints in `folder` written for `identity`; a folder left by anything else is emptied. A reader
        (`writer=False`: the ranks other than 0 of a distributed calibration) neither empties nor writes."""
        store = cls(folder, identity, writer)
        if not store.folder.is_dir():
            return store
        if writer:
            remove_stale_staging(store.folder)  # a layer file whose writer was killed mid-write
        try:
            index = json.loads((store.folder / INDEX).read_text())
        except FileNotFoundError:
            index = None
        except (OSError, ValueError) as exc:
            log.warning("layer checkpoints in %s: unreadable index (%s); calibrating from the first layer", store.folder, exc)
            index = None
        if isinstance(index, dict) and index.get("identity") == identity and isinstance(index.get("layers"), dict):
            store.layers = {int(k): v for k, v in index["layers"].items()}
        else:
            if index is not None and writer:
                log.warning("layer checkpoints in %s were written for %s, not %s: discarding them", store.folder, index.get("identity") if isinstance(index, dict) else "?", identity)
            if writer:
                store.clear()
        return store

    def load(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """(the layer's changed tensors, the algorithm's results) of a finished layer, or None when layer `index`
        must be calibrated: no checkpoint, one whose file does not match its sha256, or an earlier layer that
        was not restored."""
        from safetensors.torch import load_file

        entry = self.layers.get(index) if self._reusable else None
        path = self.folder / entry["file"] if entry else None
        problem = None if entry else "no checkpoint"
        if path is not None and not path.is_file():
            problem = "its file is missing"
        elif path is not None and sha256_file(path) != entry["sha256"]:
            problem = "its file does not match the sha256 in the index"
        if problem is not None:
            if entry is not None:
                log.warning("layer checkpoint %d in %s cannot be trusted (%s): calibrating it again", index, self.folder, problem)
            self._reusable = False
            self.layers = {i: e for i, e in self.layers.items() if i < index}
            return None
        tensors = load_file(path)
        return _strip(tensors, _LAYER), _strip(tensors, _RESULT)

    def save(self, index: int, layer: dict[str, torch.Tensor], results: dict[str, torch.Tensor]) -> None:
        """Write layer `index`'s checkpoint, then the index naming it (each atomically)."""
        from safetensors.torch import save

        tensors = {f"{_LAYER}{k}": _host(v) for k, v in layer.items()} | {f"{_RESULT}{k}": _host(v) for k, v in results.items()}
        name = f"layer-{index:05d}.safetensors"
        data = save(tensors, metadata={"layer": str(index)})
        write_bytes_atomic(self.folder / name, data)
        self.layers[index] = {"file": name, "sha256": hashlib.sha256(data).hexdigest()}
        body = {"format": FORMAT, "identity": self.identity, "layers": {str(i): e for i, e in sorted(self.layers.items())}}
        write_bytes_atomic(self.folder / INDEX, json.dumps(body, indent=1).encode())
        if os.environ.get(TEST_KILL_AFTER_LAYER) == str(index):  # test hook, see TEST_KILL_AFTER_LAYER
            os.kill(os.getpid(), signal.SIGKILL)

    def clear(self) -> None:
        self.layers = {}
        for child in self.folder.iterdir():
            if child.is_file() or child.is_symlink():
                child.unlink(missing_ok=True)


def _host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of its own (safetensors refuses tensors that share storage)."""
    return t.detach().to("cpu", copy=True).contiguous()


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------- what a layer changed


def layer_tensors(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the layer (non-persistent buffers included), by name inside it."""
    return dict(layer.named_parameters()) | dict(layer.named_buffers())


def snapshot(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the layer's tensors, to find what `apply` changes (one layer's weights in host memory)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in layer_tensors(layer).items()}


def changed_tensors(layer: torch.nn.Module, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layer's tensors whose bytes, dtype or shape differ from `before` (in-place edits through `.data`
    included, which no version counter sees)."""
    now = layer_tensors(layer)
    assert now.keys() == before.keys(), "a resumable LayerAlgorithm changes tensors, never the layer's modules"
    return {k: v for k, v in now.items() if not _same(v.detach().cpu(), before[k])}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))  # bits: -0.0 != 0.0, NaN == NaN


def assign_tensors(layer: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put checkpointed tensors into the layer, each on the device of the one it replaces."""
    for key, value in tensors.items():
        module_name, _, attr = key.rpartition(".")
        current = getattr(layer.get_submodule(module_name), attr)
        current.data = value.to(current.device)


# ------------------------------------------------------------------------------------- for calibrate


def open_checkpoints(resume_dir: Path | None, algorithm, pass_name: str, num_layers: int, num_batches: int, device: torch.device) -> LayerCheckpoints | None:
    """The checkpoints of a `calibrate` run (None where it has no resume folder or the algorithm cannot resume).
    Over several processes rank 0 opens them first (and may empty the folder), then the others open them to read."""
    from optforge import distributed

    if resume_dir is None or not algorithm.resumable:
        return None
    # a layer calibrated on another kind of device, or over another number of processes, rounds differently
    identity = {"pass": pass_name, "algorithm": type(algorithm).__qualname__, "num_layers": num_layers, "num_batches": num_batches, "device_type": device.type}
    if distributed.world_size() == 1:
        return LayerCheckpoints.open(resume_dir, identity)
    identity["processes"] = distributed.world_size()
    with distributed.leader_first():
        return LayerCheckpoints.open(resume_dir, identity, writer=distributed.is_leader())


def agree_on_restore(restored: bool, pass_name: str, index: int) -> None:
    """Over several processes: every rank restores layer `index`, or every rank calibrates it (its all-reduces
    need them all); a disagreement stops the pass instead of hanging it."""
    from optforge import distributed
    from optforge.errors import PassError

    flag = torch.tensor([int(restored)])
    if distributed.all_reduce(flag, "min") != distributed.all_reduce(flag, "max"):
        raise PassError(pass_name, f"the processes disagree on whether layer {index}'s checkpoint can be used; delete the resume folder in the cache and build again")
