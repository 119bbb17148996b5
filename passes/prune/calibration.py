"""Calibration for pruning: token windows from the recipe's text, run through the decoder one layer at a time.

Only the hidden states entering the current decoder layer are held (num_samples x seq_len x hidden floats),
never every layer's activations, so memory stays flat in the number of layers (the SparseGPT/Wanda way).
Statistics are gathered with forward hooks on the Linear layers of the current block.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from optforge.errors import PassError

# The decoder lookup and the input hooks are the quantization passes' (one layer-wise vocabulary for both).
from optforge.passes.quant.calibration import decoder_layers, watch_inputs as observe_inputs  # noqa: F401


def token_windows(tokenizer, texts: list[str], *, num_samples: int | None, seq_len: int, pass_name: str) -> torch.Tensor:
    """(num_samples, seq_len) token ids: the texts joined with EOS and cut into consecutive windows.

    `num_samples=None` takes every whole window the text gives (at least one).
    """
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


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass after the first decoder layer's inputs are seen."""


@torch.no_grad()
def _capture_first_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, batch_size: int):
    hidden: list[torch.Tensor] = []
    kwargs: list[dict] = []

    def hook(module, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for start in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


class LayerStep:
    """One decoder block during a layer-wise pass: its inputs, and outputs computed on demand.

    Call `outputs()` to run the block (cached); call `invalidate()` after changing its weights so the next block
    sees the changed outputs (sequential pruning, as in SparseGPT).
    """

    def __init__(self, index: int, layer: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict]):
        self.index, self.layer, self.inputs, self._kwargs = index, layer, inputs, kwargs
        self._outputs: list[torch.Tensor] | None = None

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        if self._outputs is None:
            outs = []
            for hidden, kw in zip(self.inputs, self._kwargs):
                out = self.layer(hidden, **kw)
                outs.append(out[0] if isinstance(out, tuple) else out)  # (B, T, D)
            self._outputs = outs
        return self._outputs

    def invalidate(self) -> None:
        self._outputs = None


def layerwise(model: nn.Module, ids: torch.Tensor, *, pass_name: str, batch_size: int = 8) -> Iterator[LayerStep]:
    """Yield each decoder block with its calibration inputs; the next block gets this block's (new) outputs."""
    layers = decoder_layers(model, pass_name)
    hidden, kwargs = _capture_first_inputs(model, layers, ids, batch_size)
    for index, layer in enumerate(layers):
        step = LayerStep(index, layer, hidden, kwargs)
        yield step
        hidden = step.outputs()


def block_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers of one block by their name inside it (`self_attn.q_proj`, `mlp.down_proj`, ...)."""
    return {name: m for name, m in layer.named_modules() if type(m) is nn.Linear}
