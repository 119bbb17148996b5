"""Unstructured and N:M (2:4) weight pruning: magnitude, Wanda and SparseGPT.

- `prune.magnitude`: zero the smallest |W| (per matrix, or one global threshold); no calibration.
- `prune.wanda`: score |W_ij| * ||X_j||_2 with X the layer's calibration inputs, compared within each output
  row (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", 2023).
- `prune.sparsegpt`: OBS-style pruning with weight reconstruction (Frantar & Alistarh, 2023); see `masks.py`.

The output is a dense checkpoint with zeros (plain `transformers` loads it). With `pattern: "2:4"` every group
of 4 consecutive input weights keeps 2, the layout PyTorch's semi-structured sparse CUDA kernels run
(`optforge.passes.prune.semi_structured`); on CPU there is no such kernel and the zeros are computed densely.
Calibration runs the decoder one block at a time (`passes/calibration.py`); pruned blocks feed the next
(sequential, as in both papers).
Limits: Llama-style decoders (`model.layers`); `lm_head` and embeddings are never pruned.
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
        from optforge.passes.output import load_input, save_output
        from optforge.passes.targets import pass_targets

        cfg = self.config
        if not 0.0 <= cfg.sparsity < 1.0:
            raise PassError(self.name, f"sparsity must be in [0, 1), found {cfg.sparsity}")
        try:
            nm = masks.parse_pattern(cfg.pattern)
        except ValueError as exc:
            raise PassError(self.name, str(exc)) from None
        model, tokenizer = load_input(artifact, ctx)
        chosen = self._prune(model, tokenizer, ctx, nm, pass_targets(self.name, model, cfg.include, cfg.exclude))
        if not chosen:
            raise PassError(self.name, f"no Linear layer matches include={cfg.include} exclude={cfg.exclude}")
        stats = sparsity_report(model, chosen)
        log.info("%s: %.1f%% of %d weights in %d matrices are zero", self.name, 100 * stats["sparsity"], stats["weights"], len(chosen))
        sparsity = {"method": self.name, "pattern": cfg.pattern, **stats}
        return save_output(model, tokenizer, artifact, self, ctx, records={"sparsity": sparsity}, properties={"sparse_2_4"} if nm == (2, 4) else ())

    def _prune(self, model, tokenizer, ctx, nm, targets: dict[str, nn.Linear]) -> list[str]:
        """Prune `targets` in place; return the names pruned."""
        raise NotImplementedError


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
    def _prune(self, model, tokenizer, ctx, nm, targets) -> list[str]:
        cfg = self.config
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


class PruneLayers(LayerAlgorithm):
    """Per decoder layer: each target's input statistic, then its pruned weight; the next layer sees the pruned
    one (sequential, as in both papers)."""

    resumable = True  # the pruned weights are the layer's changed tensors; `done` follows from the targets

    def __init__(self, prune: "_CalibratedPrune", nm: tuple[int, int] | None):
        self.prune, self.nm = prune, nm
        self.stats: dict[str, torch.Tensor] = {}
        self.done: list[str] = []

    def record(self, name, x):
        self.stats[name] = self.prune.accumulate(self.stats.get(name), x)

    def apply(self, step):
        for name, linear in step.targets.items():
            linear.weight.data = self.prune.pruned_weight(linear.weight.data, self.stats.pop(name), self.nm)
            self.done.append(name)

    def restore_layer(self, step, results):
        self.done.extend(step.targets)


class _CalibratedPrune(_UnstructuredPrune):
    """Prunes the decoder layer by layer from input statistics of each target Linear (`PruneLayers`)."""

    uses_calibration = True

    def _prune(self, model, tokenizer, ctx, nm, targets) -> list[str]:
        from optforge.passes.calibration import calibrate, token_windows

        cfg = self.config
        ids = token_windows(tokenizer, ctx.calibration_texts(), num_samples=cfg.num_samples, seq_len=cfg.seq_len, pass_name=self.name)
        layers = PruneLayers(self, nm)
        calibrate(model, list(ids.split(8)), layers, pass_name=self.name, targets=targets, progress=ctx.progress, resume_dir=ctx.resume_dir)
        return layers.done

    def accumulate(self, stat: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """The statistic after one more input x (tokens, in); `stat` is None at the first."""
        raise NotImplementedError

    def pruned_weight(self, weight: torch.Tensor, stat: torch.Tensor, nm) -> torch.Tensor:
        raise NotImplementedError


@register
class WandaPrune(_CalibratedPrune):
    name = "prune.wanda"
    Config = UnstructuredConfig

    def accumulate(self, stat, x):  # x: (tokens, in)
        return (0 if stat is None else stat) + (x * x).sum(dim=0)

    def pruned_weight(self, weight, stat, nm):
        score = weight.abs().float() * stat.sqrt().unsqueeze(0)  # |W_ij| * ||X_j||_2
        mask = masks.prune_mask(score, sparsity=self.config.sparsity, nm=nm, per_row=True)
        return weight.masked_fill(mask, 0.0)


@register
class SparseGPTPrune(_CalibratedPrune):
    name = "prune.sparsegpt"
    Config = SparseGPTConfig

    def accumulate(self, stat, x):  # x: (tokens, in)
        return (0 if stat is None else stat) + x.T @ x

    def pruned_weight(self, weight, stat, nm):
        cfg = self.config
        return masks.sparsegpt_prune(weight, stat, sparsity=cfg.sparsity, nm=nm, block_size=cfg.block_size, damp=cfg.damp)
