"""Scale folding, shared by AWQ and SmoothQuant: per input channel, the Linears that read one op's output are
multiplied by s and the op is divided by s, which leaves the float model's function unchanged.

`FOLDS` maps an architecture to its foldable (op, Linears fed) pairs inside one decoder layer; `FoldingLayers`
is the calibration half both passes share (which inputs to watch, a bounded random sample of their rows and a
per-channel statistic); each pass chooses s from them in its own `apply`.
"""

from __future__ import annotations

import torch
from torch import nn

from optforge.errors import PassError
from optforge.passes.calibration import LayerAlgorithm, decoder_layers, forward_bytes

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
# model_type -> (op whose output feeds the Linears, Linears fed) inside one decoder layer.
FOLDS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "llama": [("input_layernorm", _QKV), ("post_attention_layernorm", _GATE_UP), ("mlp.up_proj", ("mlp.down_proj",))],
    "gemma3_text": [("input_layernorm", _QKV), ("pre_feedforward_layernorm", _GATE_UP), ("mlp.up_proj", ("mlp.down_proj",))],
}
FOLDS["mistral"] = FOLDS["qwen2"] = FOLDS["qwen3"] = FOLDS["llama"]


def expert_folds(model: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """The folds of a sparse block whose experts are Linears (formats/experts.py): the norm before it into
    every expert's gate and up (and its router, `fold`), each expert's up into its down. Dense MLP layers of the
    same model (Qwen3-MoE's `mlp_only_layers`) keep the dense folds; each layer uses the ones it has."""
    from optforge.formats.experts import EXPERT_LINEARS, linear_experts

    blocks = linear_experts(model)
    if not blocks:
        return []
    gate, up, down = EXPERT_LINEARS[model.config.model_type]
    experts = [f"mlp.experts.{e}" for e in range(next(iter(blocks.values())).num_experts)]
    fed = tuple(f"{x}.{n}" for x in experts for n in (gate, up))
    return [("post_attention_layernorm", fed), *((f"{x}.{up}", (f"{x}.{down}",)) for x in experts)]


def model_folds(model: nn.Module, pass_name: str, alternative: str = "") -> list[tuple[str, tuple[str, ...]]]:
    """The folding map of `model`'s architecture, or a PassError naming its decoder layer."""
    moe = expert_folds(model)
    folds = FOLDS.get(model.config.model_type) or (FOLDS["llama"] if moe else None)
    if moe:
        return [*folds, *moe]
    if folds is None:
        layer = type(decoder_layers(model, pass_name)[0]).__name__
        raise PassError(pass_name, f"no scale-folding map for architecture '{model.config.model_type}' (decoder layer {layer}); supported: {', '.join(sorted(FOLDS))}{alternative}")
    return folds


def scaled(param: torch.Tensor, s: torch.Tensor, *, divide: bool = False) -> None:
    """param * s (or / s), rounded once to param's dtype, as a new tensor."""
    param.data = (param.data / s if divide else param.data * s).to(param.dtype)


def divide_output(op: nn.Module, s: torch.Tensor, pass_name: str = "quant.awq") -> None:
    """Make `op`'s output channels 1/s of what they were (an RMSNorm or a Linear's rows). Every change makes a new
    tensor (in the old one's dtype): a weight mapped copy-on-write from the source file keeps its pages clean."""
    if isinstance(op, nn.Linear):
        scaled(op.weight, s.unsqueeze(1), divide=True)
        if op.bias is not None:
            scaled(op.bias, s, divide=True)
    elif "Gemma" in type(op).__name__:  # Gemma RMSNorm multiplies by (1 + weight)
        op.weight.data = ((1 + op.weight.data) / s - 1).to(op.weight.dtype)
    elif hasattr(op, "weight") and op.weight is not None and op.weight.shape == s.shape:
        scaled(op.weight, s, divide=True)
    else:
        raise PassError(pass_name, f"cannot fold scales into {type(op).__name__}: no per-channel weight")


class FoldingLayers(LayerAlgorithm):
    """Per decoder layer, for each foldable group: a sample of at most `rows_per_batch` input rows per batch
    (the scale search's data) and `accumulate`'s per-channel statistic of every input row."""

    def __init__(self, folds: list[tuple[str, tuple[str, ...]]], targets: dict[str, nn.Module], rows_per_batch: int, pass_name: str):
        self.folds, self.targets, self.rows, self.pass_name = folds, targets, rows_per_batch, pass_name
        # The row sample is drawn from a seeded generator of its own, so a build gives the same bytes every time
        # (the cache and the artifact's hashes depend on it) whatever else drew from torch's global RNG.
        self.generator = torch.Generator().manual_seed(0)
        self.kept: dict[str, list[torch.Tensor]] = {}
        self.stats: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    # Rows of each group's input kept for the scale search, over all batches (the subclass's max_rows).
    max_rows: int = 4096

    def working_bytes(self, layer, batch_tokens):
        """The kept rows; the search's float32 weights (a group's together, and the rounding's intermediates of the
        largest: four copies) and its reference and trial outputs over the kept rows."""
        linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
        widths = {m.in_features for m in linears}
        kept = sum(self.max_rows * m.in_features * 4 for m in linears)
        group = max(sum(m.out_features * m.in_features * 4 for m in linears if m.in_features == n) for n in widths)
        rounding = max(4 * m.out_features * m.in_features * 4 for m in linears)
        outputs = max(2 * self.max_rows * sum(m.out_features for m in linears if m.in_features == n) * 4 for n in widths)
        return forward_bytes(layer, batch_tokens) + kept + group + rounding + outputs

    def watches(self, prefix: str, fed: tuple[str, ...]) -> bool:
        """Whether the group's inputs are recorded in layer `prefix`."""
        return all(f"{prefix}.{n}" in self.targets for n in fed)

    def accumulate(self, stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The group's per-channel statistic (in,) after rows x (tokens, in)."""
        raise NotImplementedError

    # How `accumulate`'s statistics of several ranks combine ("sum" or "max").
    combine: str = "sum"
    distributed = True

    def reduce(self, step):  # statistics combined, counts summed, every rank's row sample joined (rank order)
        from optforge.distributed import all_gather_rows, all_reduce

        for op in sorted(self.stats):
            self.stats[op] = all_reduce(self.stats[op], self.combine)
            self.counts[op] = int(all_reduce(torch.tensor([self.counts[op]], dtype=torch.int64))[0])
            rows = torch.cat(self.kept[op]) if self.kept[op] else self.stats[op].new_zeros((0, self.stats[op].shape[0]))
            joined = all_gather_rows(rows)
            self.kept[op] = [joined] if joined.shape[0] else []

    def watch(self, step):
        heads = {op: step.layer.get_submodule(fed[0]) for op, fed in self.folds if self.watches(step.name, fed)}
        self.kept = {op: [] for op in heads}
        self.stats = {op: torch.zeros(m.in_features, device=m.weight.device) for op, m in heads.items()}
        self.counts = dict.fromkeys(heads, 0)
        return heads

    def record(self, op, x):  # x (tokens, in)
        self.stats[op] = self.accumulate(self.stats[op], x)
        self.counts[op] += x.shape[0]
        self.kept[op].append(x[torch.randperm(x.shape[0], generator=self.generator)[: self.rows].to(x.device)])

    def layer_results(self, step):
        return {"generator": self.generator.get_state()}  # the next layer's row sample continues from here

    def restore_layer(self, step, results):
        self.generator.set_state(results["generator"])

    def fold(self, layer: nn.Module, op: str, fed: tuple[str, ...], s: torch.Tensor) -> None:
        """Divide `op`'s output by s, multiply the Linears it feeds by s; a sparse block's router reads the same
        input as its experts and is multiplied too (it stays float: routing unchanged up to its rounding)."""
        divide_output(layer.get_submodule(op), s, self.pass_name)
        block, sep, _ = fed[0].partition(".experts.")
        router = (f"{block}.gate",) if sep and ".experts." not in op else ()  # the block's input, not an expert's
        for name in (*fed, *router):
            scaled(layer.get_submodule(name).weight, s)
