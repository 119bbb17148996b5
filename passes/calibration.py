"""Layer-by-layer calibration: the one driver every calibrated pass runs its algorithm through.

After llm-compressor's sequential pipeline (`pipelines/sequential/`): the lifecycle is written once, here, and
each algorithm (GPTQ, AWQ, SmoothQuant, FP8 static scales, KV-cache scales, Wanda, SparseGPT, the structured
importances) is a small `LayerAlgorithm` beside its math. `calibrate(model, batches, algorithm, targets)`:

1. capture: the model runs once over the calibration batches with every decoder layer replaced by a stub
   that records the keyword arguments the layer gets (attention masks, rotary position embeddings, cache
   positions; per layer, as sliding-window and global layers get different masks) and keeps the hidden
   states entering layer 0. The output head computes one position only.
2. per decoder layer, in order:
   a. observe: forward pre-hooks on the modules `algorithm.watch(step)` names hand every input
      x (tokens, in) as float32 to `algorithm.record(key, x)` while the layer runs over the held inputs;
   b. transform: `algorithm.apply(step)` changes the layer (rounds, prunes, folds scales) or reads what it saw;
   c. propagate: the layer's outputs become the next layer's inputs, recomputed after the transform
      (`propagate = "after"`: the next layer sees the changed one, GPTQ's and SparseGPT's sequential scheme)
      or taken from the observing run (`"before"`: an algorithm that only measures);
   d. finish: `algorithm.finish(step)` swaps in the layer's output modules before it leaves the device.

Resumable builds: given the pipeline's resume folder, `calibrate` checkpoints each finished layer (what `apply`
changed in it, and the algorithm's `layer_results`) and, after a crash, restores the finished layers and runs
them forward again to rebuild the inputs of the first unfinished one (passes/layer_checkpoints.py).

Memory: the model stays where the pass loaded it (the host, for the passes that calibrate); with a `Placement`
on another device, each decoder layer moves there for its turn and back (passes/onload.py), and the hidden
states between layers (num_batches x B x T x hidden, one layer's inputs and outputs, never every layer's) sit
on the device, the host or disk as `--max-device-memory` and `--max-host-memory` allow.

Several processes (torchrun; optforge/distributed.py): each rank calibrates on its share of `batches`, and
`algorithm.reduce` all-reduces what `record` accumulated before every rank runs the same `apply`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Literal

import torch
from torch import nn

from optforge import distributed
from optforge.errors import PassError
from optforge.formats.experts import count_tokens, see_all_tokens
from optforge.evals.perplexity import leading_bos
from optforge.passes.layer_checkpoints import agree_on_restore, open_checkpoints
from optforge.passes.onload import Activations, LayerMover, Placement, Tiers, activation_tiers, clear_spill, outer_modules

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ calibration data


def calibration_samples(pass_name: str, tokenizer, ctx, num_samples: int | None) -> list[torch.Tensor]:
    """Token ids (1, T) per calibration passage (BOS first where the tokenizer adds one), truncated to the
    recipe's max_length: the batches of the quantization passes. With `data.calibration.pack`, the passages
    are joined and cut into `num_samples` samples (null: as many as they give) of exactly max_length tokens."""
    texts = ctx.calibration_texts()
    if not texts:
        raise PassError(pass_name, "needs calibration text: set data.calibration in the recipe (e.g. {dataset: boolq, rows: [2000, 2128]})")
    max_length = ctx.calibration.max_length
    bos = leading_bos(tokenizer)
    if ctx.calibration.pack:
        windows = token_windows(tokenizer, texts, num_samples=num_samples, seq_len=max_length - len(bos), pass_name=pass_name)
        return [torch.tensor([bos + w.tolist()], device=ctx.device) for w in windows]
    texts = texts[:num_samples] if num_samples else texts
    samples = [torch.tensor([(bos + tokenizer(t, add_special_tokens=False)["input_ids"])[:max_length]], device=ctx.device) for t in texts]
    if not (samples := [s for s in samples if s.shape[1] > 1]):
        raise PassError(pass_name, f"none of the {len(texts)} calibration passages gives two or more tokens with this tokenizer; check data.calibration")
    return samples


def token_windows(tokenizer, texts: list[str], *, num_samples: int | None, seq_len: int, pass_name: str) -> torch.Tensor:
    """(num_samples, seq_len) token ids: the texts joined with EOS and cut into consecutive windows (the
    pruning and distillation passes). `num_samples=None` takes every whole window the text gives (at least one)."""
    if not texts:
        raise PassError(pass_name, "needs calibration text, but the recipe has none; set data.calibration")
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + sep)
        if num_samples is not None and len(ids) >= num_samples * seq_len:
            break
    available = len(ids) // seq_len
    num_samples = available if num_samples is None else num_samples
    if available < max(num_samples, 1):
        raise PassError(pass_name, f"calibration text gives {available} windows of {seq_len} tokens, {num_samples} requested; widen data.calibration.rows or lower num_samples")
    return torch.tensor(ids[: num_samples * seq_len]).view(num_samples, seq_len)


def calibration_forward(model: nn.Module, ids: torch.Tensor, *, all_logits: bool = False):
    """model(ids) for calibration, the last position's logits only unless `all_logits`: calibration reads what goes
    into layers, and Gemma-3's 262k-vocabulary output head costs more than its 18 decoder layers together."""
    kwargs = {"input_ids": ids, "use_cache": False}
    if not all_logits and "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return model(**kwargs)


# ------------------------------------------------------------------------------------------- the driver


@dataclass
class LayerStep:
    """One decoder layer during calibration: what an algorithm's `watch` and `apply` see."""

    index: int
    name: str  # qualified name, e.g. "model.layers.3"
    layer: nn.Module
    # The pass's target modules inside this layer, by qualified name (model order).
    targets: dict[str, nn.Module]
    # Hidden states entering the layer, one (B, T, D) per batch, yielded on the compute device.
    inputs: Activations
    # The layer's outputs in the observing run, before `apply`: kept for `propagate = "before"` only (else None,
    # so memory holds no third set of activations while the changed layer's outputs are computed).
    outputs: Activations | None = None
    # Where the model lives between layers (the host while layers are onloaded): where results the algorithm
    # keeps past this layer belong.
    home: torch.device = torch.device("cpu")


class LayerAlgorithm:
    """What a calibrated pass plugs into `calibrate`: what to watch in a layer, what to keep of what it sees,
    and how to change the layer."""

    # Next layer's inputs: this layer's outputs recomputed after `apply`, or those of the observing run.
    propagate: ClassVar[Literal["after", "before"]] = "after"

    def session(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Set-up around the whole run, capture included (e.g. an attention implementation that observes)."""
        return contextlib.nullcontext()

    def watch(self, step: LayerStep) -> dict[str, nn.Module]:
        """{key: module} whose inputs `record` receives during the observing run; default the layer's targets."""
        return step.targets

    def record(self, key: str, x: torch.Tensor) -> None:
        """One input x (tokens, in), float32, of the watched module `key`."""

    def apply(self, step: LayerStep) -> None:
        """Change the layer from what was recorded (or only read it)."""

    def finish(self, step: LayerStep) -> None:
        """After the next layer's inputs are computed, before the layer goes home: put it in its output form (the
        quantized modules), so the host receives the output, not a float layer."""

    # Whether `reduce` combines what `record` accumulated on several ranks (distributed calibration).
    distributed: ClassVar[bool] = False

    def reduce(self, step: LayerStep) -> None:
        """Several ranks: turn this rank's statistics of the layer into those of every rank's batches together
        (optforge.distributed.all_reduce), identically on every rank, before `apply`."""

    def working_bytes(self, layer: nn.Module, batch_tokens: int) -> int:
        """About how much device memory calibrating `layer` takes beyond its weights and activations (statistics,
        solver buffers), for the device budget; the default is the layer forward's own intermediates."""
        return forward_bytes(layer, batch_tokens)

    # Whether `calibrate` may checkpoint finished layers and resume after them (passes/layer_checkpoints.py):
    # true when `apply` changes only tensors of the layer (never its modules) and `layer_results` holds
    # everything else a finished layer leaves in the algorithm that the pass or later layers read.
    resumable: ClassVar[bool] = False
    # True when `restore_layer` also rebuilds every tensor `apply` changed in the layer, bit for bit, from the
    # `layer_results` (GPTQ: weight = dequantize(q, scale, zero)); checkpoints then leave those tensors out.
    restores_layer: ClassVar[bool] = False

    def layer_results(self, step: LayerStep) -> dict[str, torch.Tensor]:
        """What the finished layer left in the algorithm, as named tensors (a checkpoint stores them; the
        layer's changed tensors are found and stored by the driver)."""
        return {}

    def restore_layer(self, step: LayerStep, results: dict[str, torch.Tensor]) -> None:
        """On resume: take back what `layer_results` returned for a finished layer (tensors on the CPU)."""


@torch.no_grad()
def calibrate(model: nn.Module, batches: list[torch.Tensor], algorithm: LayerAlgorithm, *, pass_name: str, targets: dict[str, nn.Module] | None = None, progress=None,
              resume_dir: Path | None = None, placement: Placement | None = None) -> set[str]:
    """Run `algorithm` over the decoder layers of `model`, one layer at a time, on token-id `batches` (B, T).

    `placement` (the pass's `PassContext.placement`): where layers compute and what memory the run may hold; a
    model on the host with a CUDA placement is onloaded layer by layer (passes/onload.py). Default: where the
    model is, no budget.

    With `resume_dir` (the pipeline's `PassContext.resume_dir`) and a `resumable` algorithm, each finished
    layer is checkpointed there, and a run that finds checkpoints of the same pass restores those layers and
    calibrates from the first one without (passes/layer_checkpoints.py).

    Returns the names of the `targets` inside decoder layers; the others (an included output head) are the
    caller's to handle (see `observe_forward`)."""
    layers = decoder_layers(model, pass_name)
    total = len(batches)  # over every rank
    if distributed.world_size() > 1:
        if not algorithm.distributed:
            raise PassError(pass_name, f"{type(algorithm).__name__} does not calibrate over several processes; run this pass without torchrun / --nproc")
        if len(batches) < distributed.world_size():
            raise PassError(pass_name, f"{len(batches)} calibration batch(es) cannot be split over {distributed.world_size()} processes; use more calibration samples or fewer processes")
        batches = distributed.shard(batches)  # each rank its share; rank 0 writes the checkpoints, every rank reads them
        if placement is not None:  # each rank spills and parks into folders of its own
            placement = placement.for_rank(distributed.rank())
    home = next(model.parameters()).device
    placement = placement or Placement.of(home)
    names = {id(m): n for n, m in model.named_modules()}
    targets = targets or {}
    covered: set[str] = set()
    checkpoints = open_checkpoints(resume_dir, algorithm, pass_name, len(layers), total, placement.device)
    tokens = max(b.numel() for b in batches)
    working = max(algorithm.working_bytes(layer, tokens) for layer in layers)
    tiers = activation_tiers(placement, layers, batches, model.config.hidden_size, model.get_input_embeddings().weight.dtype, working, pass_name)
    mover = LayerMover(layers, placement, home)
    try:
        with algorithm.session(model):
            held, kwargs = _capture(model, layers, batches, placement.device, tiers)
            advance = progress(pass_name, len(layers)) if progress else (lambda n=1: None)
            restoring = checkpoints is not None
            for index in range(len(layers)):
                layer = mover.fetch(index)
                prefix = names[id(layer)]
                local = {n: m for n, m in targets.items() if n.startswith(prefix + ".")}
                covered.update(local)
                step = LayerStep(index, prefix, layer, local, held, home=home)
                saved = checkpoints.load(index) if restoring else None
                if distributed.world_size() > 1 and restoring:
                    agree_on_restore(saved is not None, pass_name, index)
                if saved is not None:
                    held = _restore_layer(step, algorithm, kwargs[index], *saved)
                else:
                    if restoring and index:
                        log.info("resuming %s at layer %d of %d (%s; %d finished layer(s) restored from checkpoints)", pass_name, index, len(layers), prefix, index)
                    restoring = False
                    held = _calibrate_layer(step, algorithm, kwargs[index], checkpoints)
                algorithm.finish(step)
                step.inputs.release()
                kwargs[index] = []
                mover.release(index)  # home, and parked under a host budget
                advance(1)
            held.release()
    finally:
        mover.close()
        clear_spill(placement)
    distributed.barrier()  # no rank leaves while another still reads files in the resume folder
    if tiers.counts["host"] or tiers.counts["disk"]:
        log.info("%s: activations held %d batch(es) on the device, %d on the host, %d spilled to disk", pass_name, tiers.counts["device"], tiers.counts["host"], tiers.counts["disk"])
    if restoring:
        log.info("%s: all %d layers restored from checkpoints", pass_name, len(layers))
    return covered


def _calibrate_layer(step: LayerStep, algorithm: LayerAlgorithm, kwargs: list[dict], checkpoints) -> Activations:
    """Observe, apply and (with `checkpoints`) save one layer; returns the next layer's inputs."""
    from optforge.passes.layer_checkpoints import changed_tensors, snapshot

    before = algorithm.propagate == "before"
    untouched = snapshot(step.layer) if checkpoints is not None and checkpoints.writer and not algorithm.restores_layer else None
    watched = algorithm.watch(step)
    if watched or before:
        with watch_inputs(watched, algorithm.record), see_all_tokens(step.layer), count_tokens(step.layer) as routed:
            step.outputs = _run_layer(step.layer, step.inputs, kwargs, keep=before)
        note_routing(step, routed)
    if distributed.world_size() > 1:
        algorithm.reduce(step)
    algorithm.apply(step)
    if checkpoints is not None and checkpoints.writer:
        changed = changed_tensors(step.layer, untouched) if untouched is not None else {}
        checkpoints.save(step.index, changed, algorithm.layer_results(step))
    return step.outputs if before else _run_layer(step.layer, step.inputs, kwargs)


def note_routing(step: LayerStep, routed: dict[str, torch.Tensor]) -> None:
    """Keep the tokens the router sent to each expert on the experts module (`calibration_routed`, summed over
    ranks; the quantized artifact's report lists them) and log the experts that got none, which were
    calibrated on the tokens routed elsewhere only (every expert sees every token during observation)."""
    for name, counts in routed.items():
        counts = distributed.all_reduce(counts)
        step.layer.get_submodule(name).calibration_routed = counts
        idle = (counts == 0).nonzero().flatten().tolist()
        if idle:
            log.info("%s.%s: the router sent none of %d routed tokens to expert(s) %s; every expert was observed on every token",
                     step.name, name, int(counts.sum()), idle)


def _restore_layer(step: LayerStep, algorithm: LayerAlgorithm, kwargs: list[dict], changed: dict, results: dict) -> Activations:
    """A finished layer from its checkpoint; returns the next layer's inputs, computed as `_calibrate_layer` did:
    by the layer as it was (`propagate = "before"`) or as `apply` left it."""
    from optforge.passes.layer_checkpoints import assign_tensors

    outputs = _run_layer(step.layer, step.inputs, kwargs) if algorithm.propagate == "before" else None
    assign_tensors(step.layer, changed)
    algorithm.restore_layer(step, results)
    return outputs if outputs is not None else _run_layer(step.layer, step.inputs, kwargs)


class _Captured(Exception):
    """Raised by the last layer's stub: the capture has what it needs, the rest of the forward is skipped."""


@torch.no_grad()
def _capture(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor], device: torch.device, tiers: Tiers) -> tuple[Activations, list[list[dict]]]:
    """Hidden states entering layer 0 per batch, and each layer's keyword arguments per batch (the modules
    around the layers run on `device` for it, and go back where they were)."""
    first = Activations(tiers)
    kwargs: list[list[dict]] = [[] for _ in layers]

    def stub(index: int):
        def forward(hidden_states, *args, **kw):
            if index == 0:
                first.append(hidden_states)
            kw.pop("past_key_values", None)
            kwargs[index].append(kw)
            if index == len(layers) - 1:
                raise _Captured
            return hidden_states

        return forward

    outer = outer_modules(model, layers)
    home = model.get_input_embeddings().weight.device
    for module in outer:
        module.to(device)
    for i, layer in enumerate(layers):
        layer.forward = stub(i)
    try:
        for ids in batches:
            with contextlib.suppress(_Captured):
                calibration_forward(model, ids.to(device))  # the stubbed layers pass hidden states through
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward
        for module in outer:
            module.to(home)
    return first, kwargs


def _run_layer(layer: nn.Module, held: Activations, kwargs: list[dict], keep: bool = True) -> Activations | None:
    """The layer's outputs (B, T, D) per batch; with `keep=False` each is dropped as soon as it is computed."""
    outputs = Activations(held.tiers) if keep else None
    for hidden, kw in zip(held, kwargs):
        out = layer(hidden, **kw)
        if keep:
            outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def forward_bytes(layer: nn.Module, batch_tokens: int) -> int:
    """About the intermediates of one layer's forward on one batch: a few tensors as wide as its widest Linear
    (the MLP's), one of them a float32 copy for the input hooks."""
    widest = max((max(m.in_features, m.out_features) for m in layer.modules() if isinstance(m, nn.Linear)), default=0)
    element = next(layer.parameters()).element_size()
    return batch_tokens * widest * (3 * element + 4)


def decoder_layers(model: nn.Module, pass_name: str) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise PassError(pass_name, f"cannot find the decoder layers of {type(model).__name__} (expected model.model.layers, a ModuleList); calibrated passes support HF decoder-only models")
    return layers


@contextlib.contextmanager
def watch_inputs(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call fn(key, x (tokens, in) float32) with every input the modules see inside the block.

    Modules that read the same tensor one after the other (q, k and v; gate and up) get the same `x` object, so
    an algorithm can tell them apart from modules that only happen to see equal values (`x is previous_x`)."""
    handles = []
    last: list = [None, None]  # the latest raw input and its float32 rows (held until the next one)

    for key, module in modules.items():

        def hook(mod, args, key=key):
            x = args[0]
            if last[0] is not x:
                last[0], last[1] = x, x.reshape(-1, x.shape[-1]).float()
            fn(key, last[1])

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        last.clear()
        for h in handles:
            h.remove()


@torch.no_grad()
def observe_forward(model: nn.Module, batches: list[torch.Tensor], modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> None:
    """Whole-model forwards with `watch_inputs` on `modules`: for targets outside every decoder layer (an
    included output head, which then computes logits at every position)."""
    head = model.get_output_embeddings()
    all_logits = any(m is head for m in modules.values())
    device = model.get_input_embeddings().weight.device  # where the model is (the host, after onloaded calibration)
    with watch_inputs(modules, fn):
        for ids in batches:
            calibration_forward(model, ids.to(device), all_logits=all_logits)
