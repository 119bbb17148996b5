"""Shared body of the weight-only passes (RTN, GPTQ, AWQ): select Linears, pick each one's grid, let the
method produce (q, scale, zero), swap in `WeightOnlyLinear`, save a compressed-tensors checkpoint.

Mixed precision: `exclude` keeps Linears in full precision and `int8_layers` quantizes the matching ones at
INT8 per channel instead of the main grid. The layout's `precision` lists every Linear's storage.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict

import torch
from torch import nn

from optforge.artifact import ModelArtifact
from optforge.context import PassContext
from optforge.errors import PassError
from optforge.formats.grid import Grid
from optforge.pass_ import Pass, config, option

log = logging.getLogger(__name__)

Quantized = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # q (out, in) int8, scale (out, G), zero (out, G)


@config
class WeightOnlyConfig:
    bits: int = option(4, "weight bits: 4 or 8")
    group_size: int | None = option(128, "input columns per scale (32/64/128); null = one scale per output channel; halved per layer until it divides in_features")
    symmetric: bool = option(True, "symmetric grid (no zero point); false adds a zero point per group")
    full_range: bool = option(False, "symmetric grids: scale by max|w| / (qmax + 0.5) so every code is used (INT4: [-8, 7] at max|w| / 7.5); same format")
    include: tuple[str, ...] = option((r".*",), "regexes (re.search) of Linear names to quantize")
    exclude: tuple[str, ...] = option((r"(^|\.)lm_head$",), "regexes of Linear names kept in full precision; wins over include")
    int8_layers: tuple[str, ...] = option((), "regexes of Linear names quantized at INT8 per channel instead (mixed precision)")


def check_grid(pass_name: str, cfg) -> None:
    if cfg.bits not in (4, 8):
        raise PassError(pass_name, f"bits must be 4 or 8, found {cfg.bits}")
    if cfg.group_size is not None and (cfg.group_size < 8 or cfg.group_size & (cfg.group_size - 1)):
        raise PassError(pass_name, f"group_size must be a power of two >= 8 or null, found {cfg.group_size}")


def round_weights(linears: dict[str, nn.Linear], grids: dict[str, Grid], device: str | torch.device) -> dict[str, Quantized]:
    """RTN (q, scale, zero) of each Linear's weight, computed on `device` one weight at a time (a model on the
    host is never on the device whole) and kept where the weight is."""
    from optforge.formats.grid import qparams, quantize

    results = {}
    for name, linear in linears.items():
        w = linear.weight.to(device)
        scale, zero = qparams(w, grids[name])
        q = quantize(w, scale, zero, grids[name])
        results[name] = tuple(None if t is None else t.to(linear.weight.device) for t in (q, scale, zero))
    return results


def plan_grids(targets: dict[str, nn.Linear], cfg) -> dict[str, Grid]:
    main = Grid(cfg.bits, cfg.group_size, cfg.symmetric, cfg.full_range and cfg.symmetric)
    high = [re.compile(p) for p in cfg.int8_layers]
    grids = {}
    for name, linear in targets.items():
        grid = Grid(8, None, True) if any(p.search(name) for p in high) else main
        grids[name] = grid.for_width(linear.in_features)
    return grids


class WeightOnlyPass(Pass):
    requires = frozenset({"hf_causal_lm", "float_weights"})
    produces = frozenset({"hf_causal_lm", "quantized_weights"})
    removes = frozenset({"float_weights"})
    method: str = "rtn"

    def quantize(self, model: nn.Module, tokenizer, targets: dict[str, nn.Linear], grids: dict[str, Grid], ctx: PassContext) -> tuple[dict[str, Quantized], dict]:
        """Return ({name: (q, scale, zero)}, report). May edit the float model (e.g. AWQ folds scales). A Linear
        with no entry is rounded to nearest as it is swapped, one at a time (host memory never holds every
        Linear's integers at once)."""
        raise NotImplementedError

    def spec(self, grid: Grid) -> dict:
        return {"scheme": "weight_only", "method": self.method, **asdict(grid)}

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from optforge.formats import swap_linear
        from optforge.passes.output import load_input
        from optforge.passes.quant.output import write_quantized
        from optforge.passes.targets import pass_targets

        check_grid(self.name, self.config)
        model, tokenizer = load_input(artifact, ctx, onload=True)  # on the host; the methods compute on ctx.device
        targets = pass_targets(self.name, model, self.config.include, self.config.exclude)
        grids = plan_grids(targets, self.config)
        results, report = self.quantize(model, tokenizer, targets, grids, ctx)
        modules = {}
        advance = ctx.progress(f"{self.name}: storing", len(targets)) if not results else (lambda n=1: None)
        for name in list(targets):  # each float Linear and its unpacked integers freed as soon as it is swapped
            modules[name] = self.spec(grids[name])
            found = results.pop(name) if name in results else round_weights({name: targets[name]}, grids, ctx.device)[name]
            swap_linear(model, name, modules[name]).set_quantized(*found)
            del targets[name], found
            advance(1)
        return write_quantized(model, tokenizer, artifact, self, ctx, modules, report)
