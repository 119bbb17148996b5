"""Unstructured and N:M (2:4) weight pruning: magnitude, Wanda and SparseGPT.

- `prune.magnitude`: zero the smallest |W| (per matrix, or one global threshold); no calibration.
- `prune.wanda`: score |W_ij| * ||X_j||_2 with X the layer's calibration inputs, compared within each output
  row (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", 2023).
- `prune.sparsegpt`: OBS-style pruning with weight reconstruction (Frantar & Alistarh, 2023); see `masks.py`.

The output is a dense checkpoint with zeros (plain `transformers` loads it). With `pattern: "2:4"` every group
of 4 consecutive input weights keeps 2, the layout PyTorch's semi-structured sparse CUDA kernels run
(`optforge.passes.prune.semi_structured`); on CPU there is no such kernel and the zeros are computed densely.
Calibration runs the decoder one block at a time; pruned blocks feed the next (sequential, as in both papers).
Limits: Llama-style decoders (`model.layers`); `lm_head` and embeddings are never pruned.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from optforge.artifact import ModelArtifact, write_layout
from optforge.context import PassContext
from optforge.errors import PassError
from optforge.pass_ import Pass, config, option, register
from optforge.passes.prune import masks

log = logging.getLogger(__name__)


@config
class UnstructuredConfig:
    sparsity: float = option(0.5, "fraction of each pruned matrix's weights set to zero, in [0, 1); ignored for N:M patterns")
    pattern: str = option("unstructured", "'unstructured', or 'N:M' (keep N of every M consecutive input weights, e.g. '2:4')")
    include: tuple[str, ...] = option((r"\.(self_attn|mlp)\.",), "regexes (re.search) of Linear names to prune")
    exclude: tuple[str, ...] = option((r"(^|\.)lm_head$",), "regexes of Linear names never pruned; wins over include")
    num_samples: int = option(64, "calibration windows (Wanda, SparseGPT), > 0")
    seq_len: int = option(256, "tokens per calibration window, > 1")


@config
class MagnitudeConfig(UnstructuredConfig):
    scope: str = option("layer", "'layer': each matrix gets the target sparsity; 'global': one |W| threshold across all")


@config
class SparseGPTConfig(UnstructuredConfig):
    block_size: int = option(128, "columns solved together (lazy batch updates), > 0")
    damp: float = option(0.01, "Hessian dampening, as a fraction of its mean diagonal, > 0")


class _UnstructuredPrune(Pass):
    version = 1
    requires = frozenset({"hf_causal_lm", "float_weights"})
    produces = frozenset({"hf_causal_lm", "float_weights", "sparse_weights"})

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from optforge.model_io import load_model, save_model

        cfg = self.config
        if not 0.0 <= cfg.sparsity < 1.0:
            raise PassError(self.name, f"sparsity must be in [0, 1), found {cfg.sparsity}")
        try:
            nm = masks.parse_pattern(cfg.pattern)
        except ValueError as exc:
            raise PassError(self.name, str(exc)) from None
        model, tokenizer = load_model(artifact.path, dtype=ctx.model.dtype, device=ctx.device)
        chosen = self._prune(model, tokenizer, ctx, nm)
        if not chosen:
            raise PassError(self.name, f"no Linear layer matches include={cfg.include} exclude={cfg.exclude}")
        stats = sparsity_report(model, chosen)
        log.info("%s: %.1f%% of %d weights in %d matrices are zero", self.name, 100 * stats["sparsity"], stats["weights"], len(chosen))
        save_model(model.cpu(), tokenizer, ctx.output_dir)
        props = set(artifact.properties | self.produces)
        if nm == (2, 4):
            props.add("sparse_2_4")
        extra = {"architecture": artifact.layout.get("architecture"), "sparsity": {"method": self.name, "pattern": cfg.pattern, **stats}}
        write_layout(ctx.output_dir, properties=props, modules=artifact.quantized_modules, extra=extra)
        return ModelArtifact.open(ctx.output_dir)

    def _prune(self, model, tokenizer, ctx, nm) -> list[str]:
        raise NotImplementedError


def select(model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...]) -> dict[str, nn.Linear]:
    inc, exc = [re.compile(p) for p in include], [re.compile(p) for p in exclude]
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear and any(p.search(n) for p in inc) and not any(p.search(n) for p in exc)}


def sparsity_report(model: nn.Module, names: list[str]) -> dict:
    zeros = total = 0
    for name in names:
        w = model.get_submodule(name).weight
        zeros += int((w == 0).sum())
        total += w.numel()
    return {"weights": total, "zeros": zeros, "sparsity": zeros / total if total else 0.0, "modules": len(names)}


@register
class MagnitudePrune(_UnstructuredPrune):
    name = "prune.magnitude"
    Config = MagnitudeConfig

    @torch.no_grad()
    def _prune(self, model, tokenizer, ctx, nm) -> list[str]:
        cfg = self.config
        targets = select(model, cfg.include, cfg.exclude)
        if cfg.scope not in ("layer", "global"):
            raise PassError(self.name, f"scope must be 'layer' or 'global', found {cfg.scope!r}")
        threshold = None
        if cfg.scope == "global" and nm is None:
            threshold = masks.global_threshold([m.weight.abs() for m in targets.values()], cfg.sparsity)
        for linear in targets.values():
            score = linear.weight.abs()
            mask = score <= threshold if threshold is not None else masks.prune_mask(score, sparsity=cfg.sparsity, nm=nm, per_row=False)
            linear.weight[mask] = 0.0
        return list(targets)


class _CalibratedPrune(_UnstructuredPrune):
    """Walks the decoder block by block, gathers input statistics of each selected Linear, prunes the block."""

    uses_calibration = True

    def _prune(self, model, tokenizer, ctx, nm) -> list[str]:
        from optforge.passes.prune.calibration import block_linears, decoder_layers, layerwise, observe_inputs, token_windows

        cfg = self.config
        ids = token_windows(tokenizer, ctx.calibration_texts(), num_samples=cfg.num_samples, seq_len=cfg.seq_len, pass_name=self.name)
        selected = select(model, cfg.include, cfg.exclude)
        done: list[str] = []
        steps = layerwise(model, ids, pass_name=self.name)
        advance = ctx.progress(self.name, len(decoder_layers(model, self.name)))
        for step in steps:
            prefix = f"model.layers.{step.index}."
            local = {n: m for n, m in block_linears(step.layer).items() if prefix + n in selected}
            if local:
                stats: dict[str, torch.Tensor] = {}
                with observe_inputs(local, lambda name, x: self._accumulate(stats, name, x)):
                    step.outputs()
                for name, linear in local.items():
                    linear.weight.data = self._pruned_weight(linear.weight.data, stats[name], nm)
                    done.append(prefix + name)
                step.invalidate()
            advance(1)
        return done

    def _accumulate(self, stats: dict, name: str, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _pruned_weight(self, weight: torch.Tensor, stat: torch.Tensor, nm) -> torch.Tensor:
        raise NotImplementedError


@register
class WandaPrune(_CalibratedPrune):
    name = "prune.wanda"
    Config = UnstructuredConfig

    def _accumulate(self, stats, name, x):  # x: (tokens, in)
        stats[name] = stats.get(name, 0) + (x * x).sum(dim=0)

    def _pruned_weight(self, weight, stat, nm):
        score = weight.abs().float() * stat.sqrt().unsqueeze(0)  # |W_ij| * ||X_j||_2
        mask = masks.prune_mask(score, sparsity=self.config.sparsity, nm=nm, per_row=True)
        return weight.masked_fill(mask, 0.0)


@register
class SparseGPTPrune(_CalibratedPrune):
    name = "prune.sparsegpt"
    Config = SparseGPTConfig

    def _accumulate(self, stats, name, x):  # x: (tokens, in)
        stats[name] = stats.get(name, 0) + x.T @ x

    def _pruned_weight(self, weight, stat, nm):
        cfg = self.config
        return masks.sparsegpt_prune(weight, stat, sparsity=cfg.sparsity, nm=nm, block_size=cfg.block_size, damp=cfg.damp)
