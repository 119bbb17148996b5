"""SmoothQuant W8A8: INT8 weights per output channel x INT8 activations per token (Xiao et al., 2023).

Activations of LLMs have a few outlier input channels that ruin a per-token INT8 grid; weights do not.
SmoothQuant moves that difficulty into the weights: per input channel j, s_j = max|X_j|^alpha / max|W_j|^(1 -
alpha), W' = W * s and the op producing X (an RMSNorm, or `up_proj`'s rows for `down_proj`) is divided by s,
which leaves the float model unchanged. Then W' is rounded per output channel and the runtime
(`formats.int8.W8A8Linear`) quantizes each token's activations at run time and multiplies int8 x int8.
alpha is fixed or searched per Linear group on calibration rows (output error of the W8A8 product).
Layer by layer (`passes/calibration.py`): each decoder layer is smoothed and quantized before the next
sees its outputs. Limits: `o_proj` is not smoothed (no foldable op before it under GQA); architectures need
a folding map (shared with AWQ) and others fail naming the decoder layer; no static activation scales.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from optforge.artifact import ModelArtifact
from optforge.context import PassContext
from optforge.errors import PassError
from optforge.pass_ import Pass, config, option, register
from optforge.passes.quant.folding import FoldingLayers, model_folds

log = logging.getLogger(__name__)

SPEC = {"scheme": "w8a8_int8", "method": "smoothquant"}


@config
class SmoothQuantConfig:
    alpha: float | None = option(None, "migration strength in [0, 1]; null searches `alpha_grid` per Linear group")
    alpha_grid: tuple[float, ...] = option((0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), "alpha values tried when alpha is null")
    include: tuple[str, ...] = option((r".*",), "regexes (re.search) of Linear names to quantize")
    exclude: tuple[str, ...] = option((r"(^|\.)lm_head$",), "regexes of Linear names kept in full precision; wins over include")
    num_samples: int | None = option(None, "calibration passages used (null: all the recipe's rows)")
    max_rows: int = option(2048, "input rows per Linear group kept for the alpha search (bounds memory)")


def fake_w8a8(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (rows, in) @ w (out, in).T with both rounded as W8A8Linear rounds them (reference numerics)."""
    from optforge.formats.int8 import quantize_rows_int8

    xq, xs = quantize_rows_int8(x)
    wq, ws = quantize_rows_int8(w)
    return (xq.float() @ wq.float().T) * xs * ws.T


def smoothing_scale(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s (in,) = max|X_j|^alpha / max|W_j|^(1 - alpha), over all Linears reading X; never 0 or inf."""
    w_max = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
    s = act_max.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)
    return s.clamp(min=1e-5, max=1e5)


def choose_alpha(x: torch.Tensor, act_max: torch.Tensor, weights: list[torch.Tensor], alphas: tuple[float, ...]) -> tuple[float, float]:
    """(alpha, relative output error) minimizing the W8A8 error of the Linears on rows x (rows, in)."""
    refs = [x @ w.T for w in weights]
    norm = sum(float((y**2).mean()) for y in refs)
    best = (alphas[0], float("inf"))
    for alpha in alphas:
        s = smoothing_scale(act_max, weights, alpha)
        err = sum(float(((fake_w8a8(x / s, w * s) - y) ** 2).mean()) for w, y in zip(weights, refs))
        if err < best[1]:
            best = (alpha, err)
    return best[0], best[1] / max(norm, 1e-30)


def swap_w8a8(model: nn.Module, name: str, spec: dict) -> None:
    from optforge.formats import replace_linear

    replace_linear(model, name, spec, lambda new, old: new.set_float(old.weight))


class SmoothQuantLayers(FoldingLayers):
    """Per decoder layer: max |x| per input channel of each group, alpha, the fold; then every target of the
    layer becomes W8A8, so the next layer sees the quantized one."""

    def __init__(self, model, folds, targets, cfg: SmoothQuantConfig, rows_per_batch: int, pass_name: str, report: dict):
        super().__init__(folds, targets, rows_per_batch, pass_name)
        self.model, self.report, self.done, self.max_rows = model, report, [], cfg.max_rows
        self.alphas = (cfg.alpha,) if cfg.alpha is not None else cfg.alpha_grid

    combine = "max"
    resumable = True
    restores_layer = True  # a checkpoint holds the whole finished layer: its Linears become W8A8 modules

    def accumulate(self, stat, x):
        return torch.maximum(stat, x.abs().amax(0))

    def layer_results(self, step):
        report, ops = self.report, [op for op, _ in self.folds]
        found = {f"{key}.{op}": torch.tensor(report[key + "s"][f"{step.name}.{op}"], dtype=torch.float64)
                 for key in ("alpha", "error") for op in ops if f"{step.name}.{op}" in report[key + "s"]}
        skipped = {f"uncalibrated.{op}": torch.ones(1) for op in ops if f"{step.name}.{op}" in report["uncalibrated"]}
        state = {f"layer.{k}": v for k, v in step.layer.state_dict().items()}
        return super().layer_results(step) | found | skipped | state

    def restore_layer(self, step, results):
        from optforge.formats import replace_linear
        from optforge.passes.layer_checkpoints import assign_tensors

        super().restore_layer(step, results)
        report = self.report
        for op, _ in self.folds:
            for key in ("alpha", "error"):
                if f"{key}.{op}" in results:
                    report[key + "s"][f"{step.name}.{op}"] = float(results[f"{key}.{op}"])
            if f"uncalibrated.{op}" in results:
                report["uncalibrated"].append(f"{step.name}.{op}")
        smoothed = {f"{step.name}.{n}" for op, fed in self.folds if f"{step.name}.{op}" in report["alphas"] for n in fed}
        device = next(step.layer.parameters()).device
        for name in step.targets:
            if name not in smoothed:
                report["unsmoothed"].append(name)
            replace_linear(self.model, name, SPEC, lambda new, old: new.to(device))  # empty W8A8 buffers, filled from the checkpoint below
            self.done.append(name)
        assign_tensors(step.layer, {k[len("layer."):]: v for k, v in results.items() if k.startswith("layer.")})

    def apply(self, step):
        report = self.report
        for op, fed in self.folds:
            if op not in self.kept or not self.watches(step.name, fed):  # a fold of another kind of layer (MoE/dense MLP)
                continue
            if not self.kept[op]:
                report["uncalibrated"].append(f"{step.name}.{op}")
                continue
            weights = [step.layer.get_submodule(n).weight.detach().float() for n in fed]  # float32 for the search
            alpha, err = choose_alpha(torch.cat(self.kept.pop(op)), self.stats[op], weights, self.alphas)
            self.fold(step.layer, op, fed, smoothing_scale(self.stats[op], weights, alpha))
            report["alphas"][f"{step.name}.{op}"] = alpha
            report["errors"][f"{step.name}.{op}"] = round(err, 6)
        smoothed = {f"{step.name}.{n}" for op, fed in self.folds if f"{step.name}.{op}" in report["alphas"] for n in fed}
        for name in step.targets:
            if name not in smoothed:
                report["unsmoothed"].append(name)
            swap_w8a8(self.model, name, SPEC)
            self.done.append(name)


@register
class SmoothQuant(Pass):
    name = "quant.smoothquant"
    version = 3  # 3: the alpha search's row sample comes from a seeded generator; 2: an all-zero weight row stores scale 1
    Config = SmoothQuantConfig
    requires = frozenset({"hf_causal_lm", "float_weights"})
    produces = frozenset({"hf_causal_lm", "quantized_weights", "quantized_activations"})
    removes = frozenset({"float_weights"})
    uses_calibration = True

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from optforge.passes.calibration import calibrate, calibration_samples
        from optforge.passes.output import load_input
        from optforge.passes.quant.output import write_quantized
        from optforge.passes.targets import pass_targets

        cfg = self.config
        if cfg.alpha is not None and not 0.0 <= cfg.alpha <= 1.0:
            raise PassError(self.name, f"alpha must be in [0, 1] or null (searched), found {cfg.alpha}")
        model, tokenizer = load_input(artifact, ctx, onload=True)
        folds = model_folds(model, self.name)
        targets = pass_targets(self.name, model, cfg.include, cfg.exclude)
        started = time.perf_counter()
        samples = calibration_samples(self.name, tokenizer, ctx, cfg.num_samples)
        report = {"method": "smoothquant", "samples": len(samples), "alphas": {}, "errors": {}, "unsmoothed": [], "uncalibrated": []}
        layers = SmoothQuantLayers(model, folds, targets, cfg, max(1, cfg.max_rows // len(samples)), self.name, report)
        calibrate(model, samples, layers, pass_name=self.name, targets=targets, progress=ctx.progress, resume_dir=ctx.resume_dir, placement=ctx.placement)
        for name in sorted(set(targets) - set(layers.done)):
            swap_w8a8(model, name, SPEC)  # outside the decoder layers (e.g. an included lm_head)
            report["unsmoothed"].append(name)
        report["calibration_seconds"] = round(time.perf_counter() - started, 2)
        return write_quantized(model, tokenizer, artifact, self, ctx, dict.fromkeys(targets, SPEC), report)
