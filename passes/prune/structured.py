"""Structured pruning that really shrinks the model: MLP width, attention heads (GQA-aware), whole layers.

Importance is measured on calibration text, one decoder block at a time (`passes/calibration.py`):
- `prune.mlp_width`: channel j of the MLP scores ||X_j||_2 * ||W_down[:, j]||_2, X the input of `down_proj`
  (the Wanda score summed over the channel's column, as in LLM-Pruner/Minitron width pruning).
- `prune.heads`: query head h scores ||X_h||_2 * ||W_o[:, h]||_F on the input of `o_proj`. GQA is respected:
  `unit: query` drops the same number of query heads inside every KV group; `unit: kv_group` drops whole KV
  heads with their query heads.
- `prune.depth`: block importance BI = 1 - mean cos(h_in, h_out) (Men et al., "ShortGPT", 2024); the
  `num_layers` blocks with the lowest BI are dropped.

Every layer keeps the same width, so config.json stays a plain Llama config (`intermediate_size`,
`num_attention_heads`, `num_key_value_heads`, `num_hidden_layers`) that `transformers` loads as is; per-layer
widths would need a custom config and are not offered. Limits: Llama-style blocks (`mlp.gate_proj/up_proj/
down_proj`, `self_attn.q/k/v/o_proj`); biases, if any, are sliced with their rows.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from optforge.artifact import ModelArtifact
from optforge.context import PassContext
from optforge.errors import PassError
from optforge.pass_ import Pass, config, option, register
from optforge.passes.calibration import LayerAlgorithm

log = logging.getLogger(__name__)


@config
class StructuredConfig:
    num_samples: int = option(32, "calibration windows, > 0")
    seq_len: int = option(256, "tokens per calibration window, > 1")


@config
class MLPWidthConfig(StructuredConfig):
    ratio: float = option(0.25, "fraction of MLP intermediate channels removed in every layer, in [0, 1)")
    multiple_of: int = option(32, "kept width is rounded down to a multiple of this (kernel-friendly shapes), > 0")


@config
class HeadsConfig(StructuredConfig):
    ratio: float = option(0.34, "fraction of query heads (unit 'query', per KV group) or KV groups removed, rounded to whole heads")
    unit: str = option("query", "'query': drop query heads inside each KV group; 'kv_group': drop whole KV heads with their query heads")


@config
class DepthConfig(StructuredConfig):
    num_layers: int = option(4, "decoder blocks removed (the least important by block importance), >= 1")


def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping rows (dim 0: outputs) or columns (dim 1: inputs) `index` of `linear`."""
    weight = linear.weight.data.index_select(dim, index)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, dtype=weight.dtype, device=weight.device)
    out.weight.data.copy_(weight)
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias.data if dim == 1 else linear.bias.data.index_select(0, index))
    return out


class ImportanceLayers(LayerAlgorithm):
    """Per decoder layer, changing nothing until every layer is scored: the pass's importance from ||X_j||_2 of
    one module's inputs (`scored_input`), or from the layer's inputs and outputs."""

    propagate = "before"
    resumable = True

    def __init__(self, prune: "_StructuredPrune"):
        self.prune = prune
        self.scores: list[torch.Tensor] = []
        self.squares: torch.Tensor | None = None

    def watch(self, step):
        self.squares = None
        module = self.prune.scored_input(step.layer)
        return {} if module is None else {"input": module}

    def record(self, key, x):  # x: (tokens, in)
        self.squares = (0 if self.squares is None else self.squares) + (x * x).sum(dim=0)

    def apply(self, step):
        norms = None if self.squares is None else self.squares.sqrt()
        self.scores.append(self.prune.importance(step, norms))

    def layer_results(self, step):
        return {"score": self.scores[step.index]}

    def restore_layer(self, step, results):
        self.scores.append(results["score"].to(next(step.layer.parameters()).device))


class _StructuredPrune(Pass):
    version = 1
    uses_calibration = True
    requires = frozenset({"hf_causal_lm", "float_weights"})
    produces = frozenset({"hf_causal_lm", "float_weights", "structurally_pruned"})

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from optforge.passes.calibration import calibrate, decoder_layers, token_windows
        from optforge.passes.output import load_input, save_output

        if artifact.quantized_modules:
            raise PassError(self.name, "its input has quantized modules; prune before quantizing")
        model, tokenizer = load_input(artifact, ctx)
        layers = decoder_layers(model, self.name)
        self.check(model, layers)
        params_before = sum(p.numel() for p in model.parameters())
        ids = token_windows(tokenizer, ctx.calibration_texts(), num_samples=self.config.num_samples, seq_len=self.config.seq_len, pass_name=self.name)
        importance = ImportanceLayers(self)
        calibrate(model, list(ids.split(8)), importance, pass_name=self.name, progress=ctx.progress, resume_dir=ctx.resume_dir)
        summary = self._shrink(model, layers, importance.scores)
        params_after = sum(p.numel() for p in model.parameters())
        log.info("%s: %s; parameters %d -> %d", self.name, summary, params_before, params_after)
        record = {"method": self.name, "parameters_before": params_before, "parameters_after": params_after, **summary}
        return save_output(model, tokenizer, artifact, self, ctx, records={"structured_pruning": record})

    def check(self, model: nn.Module, layers: nn.ModuleList) -> None:
        """Raise PassError for a model this pruning cannot shrink."""

    def scored_input(self, layer: nn.Module) -> nn.Module | None:
        """The module of `layer` whose input norms `importance` reads (None: none)."""
        return None

    def importance(self, step, input_norms: torch.Tensor | None) -> torch.Tensor:
        """The layer's score(s), from `input_norms` (||X_j||_2 per input feature of `scored_input`) or the step."""
        raise NotImplementedError

    def _shrink(self, model: nn.Module, layers: nn.ModuleList, scores: list[torch.Tensor]) -> dict:
        raise NotImplementedError


@register
class MLPWidthPrune(_StructuredPrune):
    name = "prune.mlp_width"
    Config = MLPWidthConfig

    def check(self, model, layers):
        sparse = [i for i, layer in enumerate(layers) if not isinstance(getattr(layer.mlp, "down_proj", None), nn.Linear)]
        if sparse:
            raise PassError(self.name, f"the MLPs of layers {sparse[:8]} are mixture-of-experts blocks (or lack a down_proj Linear): "
                                       "prune.mlp_width shrinks one dense MLP per layer. Prune experts' weights with prune.wanda or prune.sparsegpt")

    def scored_input(self, layer):
        return layer.mlp.down_proj

    def importance(self, step, input_norms):
        return input_norms * step.layer.mlp.down_proj.weight.detach().float().norm(dim=0)  # (intermediate,)

    def _shrink(self, model, layers, scores):
        cfg = self.config
        width = scores[0].numel()
        keep = int(width * (1.0 - cfg.ratio)) // cfg.multiple_of * cfg.multiple_of
        if not 0 < keep <= width or not 0.0 <= cfg.ratio < 1.0:
            raise PassError(self.name, f"ratio {cfg.ratio} with multiple_of {cfg.multiple_of} leaves {keep} of {width} channels; use 0 <= ratio < 1 and a smaller multiple_of")
        for layer, score in zip(layers, scores):
            index = score.topk(keep).indices.sort().values.to(layer.mlp.down_proj.weight.device)
            mlp = layer.mlp
            mlp.gate_proj, mlp.up_proj = slice_linear(mlp.gate_proj, index, 0), slice_linear(mlp.up_proj, index, 0)
            mlp.down_proj = slice_linear(mlp.down_proj, index, 1)
            mlp.intermediate_size = keep
        model.config.intermediate_size = keep
        return {"intermediate_size": [width, keep]}


@register
class HeadsPrune(_StructuredPrune):
    name = "prune.heads"
    Config = HeadsConfig

    def scored_input(self, layer):
        return layer.self_attn.o_proj

    def importance(self, step, input_norms):
        attn = step.layer.self_attn
        heads, dim = step.layer.self_attn.config.num_attention_heads, attn.head_dim
        x = input_norms.view(heads, dim).norm(dim=1)
        w = attn.o_proj.weight.detach().float().view(-1, heads, dim).norm(dim=(0, 2))
        return x * w  # (heads,)

    def _shrink(self, model, layers, scores):
        cfg, conf = self.config, model.config
        heads, kv = conf.num_attention_heads, conf.num_key_value_heads
        dim = getattr(conf, "head_dim", None) or conf.hidden_size // heads
        per_group = heads // kv
        if cfg.unit == "query":
            drop = round(per_group * cfg.ratio)
            new_heads, new_kv = kv * (per_group - drop), kv
        elif cfg.unit == "kv_group":
            drop = round(kv * cfg.ratio)
            new_heads, new_kv = (kv - drop) * per_group, kv - drop
        else:
            raise PassError(self.name, f"unit must be 'query' or 'kv_group', found {cfg.unit!r}")
        if drop <= 0 or new_heads <= 0:
            raise PassError(self.name, f"ratio {cfg.ratio} removes {drop} {cfg.unit} unit(s) of {per_group if cfg.unit == 'query' else kv}; choose a ratio that removes at least one and keeps at least one")
        if conf.hidden_size % new_heads:
            # transformers' LlamaConfig refuses hidden_size % num_attention_heads != 0 even with head_dim set.
            raise PassError(self.name, f"{new_heads} query heads do not divide hidden_size {conf.hidden_size}, so transformers would refuse the config; choose a ratio that keeps a divisor of {conf.hidden_size} heads (now {heads})")
        for layer, score in zip(layers, scores):
            grouped = score.view(kv, per_group).cpu()  # query heads h = g * per_group + i share KV head g; index math on CPU
            if cfg.unit == "query":
                keep_q = grouped.topk(per_group - drop, dim=1).indices.sort(dim=1).values + torch.arange(kv).unsqueeze(1) * per_group
                keep_kv = torch.arange(kv)
            else:
                keep_kv = grouped.sum(dim=1).topk(kv - drop).indices.sort().values
                keep_q = keep_kv.unsqueeze(1) * per_group + torch.arange(per_group)
            attn = layer.self_attn
            device = attn.q_proj.weight.device
            rows_q = _head_rows(keep_q.flatten(), dim).to(device)
            rows_kv = _head_rows(keep_kv, dim).to(device)
            attn.q_proj, attn.o_proj = slice_linear(attn.q_proj, rows_q, 0), slice_linear(attn.o_proj, rows_q, 1)
            attn.k_proj, attn.v_proj = slice_linear(attn.k_proj, rows_kv, 0), slice_linear(attn.v_proj, rows_kv, 0)
        conf.num_attention_heads, conf.num_key_value_heads, conf.head_dim = new_heads, new_kv, dim
        return {"num_attention_heads": [heads, new_heads], "num_key_value_heads": [kv, new_kv]}


def _head_rows(heads: torch.Tensor, dim: int) -> torch.Tensor:
    """Weight rows of the given heads: head h owns rows [h*dim, (h+1)*dim)."""
    return (heads.unsqueeze(1) * dim + torch.arange(dim)).flatten()


@register
class DepthPrune(_StructuredPrune):
    name = "prune.depth"
    Config = DepthConfig

    def importance(self, step, input_norms):
        cos = [nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean() for a, b in zip(step.inputs, step.outputs)]
        return 1.0 - torch.stack(cos).mean()  # block importance: how much the block changes its input

    def _shrink(self, model, layers, scores):
        n = self.config.num_layers
        if not 0 < n < len(layers):
            raise PassError(self.name, f"num_layers must be in [1, {len(layers) - 1}] for a {len(layers)}-layer model, found {n}")
        bi = torch.stack(scores)
        dropped = sorted(bi.topk(n, largest=False).indices.tolist())
        kept = [i for i in range(len(layers)) if i not in dropped]
        model.model.layers = nn.ModuleList(layers[i] for i in kept)
        for new_index, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = new_index
        conf = model.config
        conf.num_hidden_layers = len(kept)
        if getattr(conf, "layer_types", None):
            conf.layer_types = [conf.layer_types[i] for i in kept]
        return {"dropped_layers": dropped, "block_importance": [round(float(s), 5) for s in bi], "num_hidden_layers": [len(layers), len(kept)]}
