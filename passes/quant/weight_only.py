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
from optforge.formats import replace_linear
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


class Swapper:
    """Swaps target Linears for their `WeightOnlyLinear`s as their integers become final. The calibrated passes call
    `layer` per decoder layer from their algorithm's `finish`, while the layer is on the compute device, so a layer
    goes back to the host in its output form and the host never holds the float model beside the quantized one;
    `rest` swaps whatever is left (RTN, Linears outside the decoder layers). A swapped float Linear's storage is freed
    (`formats.replace_linear`)."""

    def __init__(self, model: nn.Module, targets: dict[str, nn.Linear], grids: dict[str, Grid], spec, device: str | torch.device):
        self.model, self.targets, self.grids, self.spec, self.device = model, targets, grids, spec, device
        self.modules: dict[str, dict] = {}  # swapped Linear -> its spec (the compressed-tensors config's source)

    def __call__(self, name: str, found: Quantized | None = None) -> None:
        """Swap `name` with `found` (q, scale, zero), or rounded to nearest on its grid where None."""
        linear = self.targets[name]
        if found is None:
            found = round_weights({name: linear}, self.grids, self.device)[name]
        self.modules[name] = self.spec(self.grids[name])
        replace_linear(self.model, name, self.modules[name], lambda new, old: new.set_quantized(*found))

    def layer(self, names, results: dict[str, Quantized] | None = None) -> None:
        """Swap the layer's Linears `names`, each with its entry popped from `results` or rounded to nearest."""
        for name in names:
            if name not in self.modules:
                self(name, (results or {}).pop(name, None))

    def rest(self, results: dict[str, Quantized], progress) -> None:
        left = [name for name in self.targets if name not in self.modules]
        advance = progress("storing", len(left)) if left and not results else (lambda n=1: None)
        for name in left:  # each float Linear and its unpacked integers freed as soon as it is swapped
            self(name, results.pop(name, None))
            advance(1)


class WeightOnlyPass(Pass):
    requires = frozenset({"hf_causal_lm", "float_weights"})
    produces = frozenset({"hf_causal_lm", "quantized_weights"})
    removes = frozenset({"float_weights"})
    method: str = "rtn"

    def quantize(self, model: nn.Module, tokenizer, targets: dict[str, nn.Linear], grids: dict[str, Grid], ctx: PassContext,
                 swap: Swapper) -> tuple[dict[str, Quantized], dict]:
        """Return ({name: (q, scale, zero)}, report) for Linears not yet handed to `swap` (a calibrated method
        swaps each decoder layer's as it finishes). May edit the float model (e.g. AWQ folds scales). A Linear
        with no entry is rounded to nearest as it is swapped, one at a time (host memory never holds every
        Linear's integers at once)."""
        raise NotImplementedError

    def spec(self, grid: Grid) -> dict:
        return {"scheme": "weight_only", "method": self.method, **asdict(grid)}

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from optforge.passes.output import load_input
        from optforge.passes.quant.output import write_quantized
        from optforge.passes.targets import pass_targets

        check_grid(self.name, self.config)
        model, tokenizer = load_input(artifact, ctx, onload=True)  # on the host; the methods compute on ctx.device
        targets = pass_targets(self.name, model, self.config.include, self.config.exclude)
        grids = plan_grids(targets, self.config)
        swap = Swapper(model, targets, grids, self.spec, ctx.device)
        results, report = self.quantize(model, tokenizer, targets, grids, ctx, swap)
        swap.rest(results, lambda desc, total: ctx.progress(f"{self.name}: {desc}", total))
        modules = {name: swap.modules[name] for name in targets}  # in model order, whatever order they were swapped in
        return write_quantized(model, tokenizer, artifact, self, ctx, modules, report)
