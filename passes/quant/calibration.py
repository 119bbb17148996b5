"""Layer-by-layer calibration: run the recipe's calibration text through one decoder layer at a time.

The model runs once with every decoder layer replaced by a stub that records its keyword arguments
(masks, rotary embeddings), keeping only the hidden states entering layer 0. Then for each layer in turn a
visitor hooks it, runs it over the held inputs, quantizes it, and the quantized layer's outputs become the
next layer's inputs. Memory holds one layer's inputs and outputs, never every layer's activations
(GPTQ's "sequential" scheme; AWQ and SmoothQuant use the same driver).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Callable, Iterator

import torch
from torch import nn

from optforge.evals.perplexity import leading_bos  # noqa: F401  (re-exported: passes import it from here)
from optforge.errors import PassError

log = logging.getLogger(__name__)


def calibration_samples(pass_name: str, tokenizer, ctx, num_samples: int | None) -> list[torch.Tensor]:
    """Token ids (1, T) per calibration passage, truncated to the recipe's max_length."""
    texts = ctx.calibration_texts()
    if not texts:
        raise PassError(pass_name, "needs calibration text: set data.calibration in the recipe (e.g. {dataset: boolq, rows: [2000, 2128]})")
    texts = texts[:num_samples] if num_samples else texts
    max_length = ctx.calibration.max_length
    bos = leading_bos(tokenizer)
    samples = [torch.tensor([(bos + tokenizer(t, add_special_tokens=False)["input_ids"])[:max_length]], device=ctx.device) for t in texts]
    return [s for s in samples if s.shape[1] > 1]


def calibration_forward(model: nn.Module, ids: torch.Tensor, *, all_logits: bool = False):
    """model(ids) for calibration, computing the last position's logits only unless `all_logits`.

    Calibration reads what goes into layers, not the logits; with Gemma-3's 262k vocabulary the output head
    costs more than the 18 decoder layers together, so skipping it for T - 1 positions matters.
    """
    kwargs = {"input_ids": ids, "use_cache": False}
    if not all_logits and "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return model(**kwargs)


def decoder_layers(model: nn.Module, pass_name: str) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise PassError(pass_name, f"cannot find the decoder layers of {type(model).__name__} (expected model.model.layers, a ModuleList); calibrated passes support HF decoder-only models")
    return layers


@torch.no_grad()
def _capture(model: nn.Module, layers: nn.ModuleList, samples: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Hidden states entering layer 0 per sample, and each layer's keyword arguments per sample."""
    first: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in layers]

    def stub(index: int):
        def forward(hidden_states, *args, **kw):
            if index == 0:
                first.append(hidden_states)
            kw.pop("past_key_values", None)
            kwargs[index].append(kw)
            return hidden_states

        return forward

    for i, layer in enumerate(layers):
        layer.forward = stub(i)
    try:
        for ids in samples:
            calibration_forward(model, ids)  # the stubbed layers pass hidden states through: logits unused
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward
    return first, kwargs


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_layerwise(model: nn.Module, samples: list[torch.Tensor], visit: Callable[[int, nn.Module, Callable[[], None]], None], *, pass_name: str, progress=None) -> None:
    """Call visit(index, layer, forward_all) per decoder layer, in order; visit quantizes the layer."""
    layers = decoder_layers(model, pass_name)
    hidden, kwargs = _capture(model, layers, samples)
    advance = progress(pass_name, len(layers)) if progress else (lambda n=1: None)
    for i, layer in enumerate(layers):

        def forward_all(layer=layer, i=i) -> None:
            for h, kw in zip(hidden, kwargs[i]):
                layer(h, **kw)

        visit(i, layer, forward_all)
        hidden = [_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs[i])]
        kwargs[i] = []
        advance(1)


@contextlib.contextmanager
def watch_inputs(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call fn(name, x (tokens, in_features)) with every input the modules see inside the block."""
    handles = []
    for name, module in modules.items():

        def hook(mod, args, name=name):
            x = args[0]
            fn(name, x.reshape(-1, x.shape[-1]).float())

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def layer_targets(layer: nn.Module, prefix: str, targets: dict[str, nn.Linear]) -> dict[str, nn.Linear]:
    """The targets inside `layer` (qualified name `prefix`), keyed by their name relative to the layer."""
    return {name[len(prefix) + 1 :]: mod for name, mod in targets.items() if name.startswith(prefix + ".")}
