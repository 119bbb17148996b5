"""AWQ: activation-aware weight-only quantization (Lin et al., 2023, "AWQ").

Input channels that carry large activations matter more, so before rounding each group of Linears that
read the same input is rescaled: W' = W * s (per input channel), and the op that produces that input is
divided by s (an RMSNorm weight, or the rows of `up_proj` for `down_proj`), leaving the float model's
function unchanged. s = mean|x|^alpha, with alpha searched on a grid to minimize the output error of
the quantized Linears on calibration activations. Layer by layer through `passes/calibration.py`;
only a bounded sample of each group's input rows is kept. Limits: no weight-clipping search; `o_proj`
is rounded plainly (its input comes from attention, no foldable op with GQA); architectures need a
folding map (`folding.FOLDS`), and others fail with an error naming the decoder layer.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from optforge.formats.grid import fake_quantize
from optforge.pass_ import config, option, register
from optforge.passes.quant.folding import FoldingLayers, model_folds
from optforge.passes.quant.weight_only import WeightOnlyConfig, WeightOnlyPass

log = logging.getLogger(__name__)

@config
class AWQConfig(WeightOnlyConfig):
    grid_points: int = option(20, "alpha values tried in [0, 1)")
    max_rows: int = option(4096, "input rows per Linear group kept for the scale search (bounds memory)")
    num_samples: int | None = option(None, "calibration passages used (null: all the recipe's rows)")


def search_scale(linears: list[nn.Linear], grids: list, x: torch.Tensor, x_mean: torch.Tensor, points: int) -> tuple[torch.Tensor, float, float]:
    """Best s (in,) for the Linears reading x (rows, in); returns (s, alpha, relative error vs alpha=0).

    The search runs in float32, one Linear's float32 weight at a time (a 70B MLP's is 0.9 GB)."""
    ref = [x @ lin.weight.float().T for lin in linears]
    best = (None, 0.0, float("inf"))
    first = None
    for k in range(points):
        alpha = k / points
        s = x_mean.clamp(min=1e-4) ** alpha
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for lin, grid, y in zip(linears, grids, ref):
            wq = fake_quantize(lin.weight.float() * s, grid) / s
            err += float(((x @ wq.T - y) ** 2).mean())
        first = err if first is None else first
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2] / first if first else 1.0


class AWQLayers(FoldingLayers):
    """Per decoder layer: mean |x| per input channel of each group, the alpha search, the fold."""

    resumable = True

    def __init__(self, folds, targets, grids, cfg: AWQConfig, rows_per_batch: int, pass_name: str, swap=None):
        super().__init__(folds, targets, rows_per_batch, pass_name)
        self.grids, self.points, self.max_rows, self.swap = grids, cfg.grid_points, cfg.max_rows, swap
        self.alphas: dict[str, float] = {}
        self.scaled: set[str] = set()

    def watches(self, prefix, fed):
        return f"{prefix}.{fed[0]}" in self.targets

    def accumulate(self, stat, x):
        return stat + x.abs().sum(0)

    def apply(self, step):
        for op, fed in self.folds:
            full = [f"{step.name}.{n}" for n in fed]
            if op not in self.kept or not all(f in self.targets for f in full) or self.counts[op] == 0:
                continue
            linears = [step.layer.get_submodule(n) for n in fed]
            x = torch.cat(self.kept.pop(op))
            s, alpha, _ = search_scale(linears, [self.grids[f] for f in full], x, self.stats[op] / self.counts[op], self.points)
            self.fold(step.layer, op, fed, s)
            self.alphas[f"{step.name}.{op}"] = alpha
            self.scaled.update(full)

    def finish(self, step):  # the layer's Linears rounded on their grids, scaled or not, and swapped
        if self.swap is not None:
            self.swap.layer(step.targets)

    def layer_results(self, step):
        alphas = {f"alpha.{op}": torch.tensor(self.alphas[f"{step.name}.{op}"], dtype=torch.float64) for op, _ in self.folds if f"{step.name}.{op}" in self.alphas}
        return super().layer_results(step) | alphas

    def restore_layer(self, step, results):
        super().restore_layer(step, results)
        for op, fed in self.folds:
            if f"alpha.{op}" in results:
                self.alphas[f"{step.name}.{op}"] = float(results[f"alpha.{op}"])
                self.scaled.update(f"{step.name}.{n}" for n in fed)


@register
class AWQ(WeightOnlyPass):
    name = "quant.awq"
    version = 2  # 2: the scale search's row sample comes from a seeded generator (builds are reproducible)
    Config = AWQConfig
    uses_calibration = True
    method = "awq"

    def quantize(self, model, tokenizer, targets, grids, ctx, swap):
        from optforge.passes.calibration import calibrate, calibration_samples

        folds = model_folds(model, self.name, ". Use quant.gptq or quant.rtn for this model")
        cfg = self.config
        started = time.perf_counter()
        samples = calibration_samples(self.name, tokenizer, ctx, cfg.num_samples)
        layers = AWQLayers(folds, targets, grids, cfg, max(1, cfg.max_rows // len(samples)), self.name, swap)
        calibrate(model, samples, layers, pass_name=self.name, targets=targets, progress=ctx.progress, resume_dir=ctx.resume_dir, placement=ctx.placement)
        report = {
            "method": "awq",
            "samples": len(samples),
            "calibration_seconds": round(time.perf_counter() - started, 2),
            "alphas": layers.alphas,
            # Rounded with no scale search (no foldable op before them, e.g. o_proj): RTN quality.
            "unscaled": sorted(set(targets) - layers.scaled),
        }
        return {}, report
