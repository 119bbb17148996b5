"""FP8 (E4M3) weights and activations: the W8A8-FP8 scheme of Hopper-class GPUs (Micikevicius et al., 2022).

Weights are scaled per output channel or per tensor so their max maps to 448 (E4M3's largest value) and
cast. Activations are either dynamic (one scale per token computed at run time, no calibration) or static
(one per-tensor scale per Linear from the max |x| seen on the recipe's calibration text, layer by layer
through `passes/calibration.py`; cheaper at run time, clipped if serving sees larger values). Runs on `formats.fp8.Fp8Linear`: `torch._scaled_mm` on
CUDA sm89+, E4M3-rounded float matmul elsewhere. Limits: no SmoothQuant-style smoothing; a Linear that
sees no calibration signal in static mode is an error (never a zero scale).
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import torch

from optforge.artifact import ModelArtifact
from optforge.context import PassContext
from optforge.errors import PassError
from optforge.pass_ import Pass, config, option, register
from optforge.passes.calibration import LayerAlgorithm

log = logging.getLogger(__name__)


@config
class Fp8Config:
    strategy: Literal["channel", "tensor"] = option("channel", "weight scales: one per output channel, or one per tensor")
    dynamic: bool = option(True, "activation scales per token at run time (true) or static per tensor from calibration (false)")
    include: tuple[str, ...] = option((r".*",), "regexes (re.search) of Linear names to quantize")
    exclude: tuple[str, ...] = option((r"(^|\.)lm_head$",), "regexes of Linear names kept in full precision; wins over include")
    num_samples: int | None = option(None, "calibration passages used for static scales (null: all the recipe's rows)")


class InputAmax(LayerAlgorithm):
    """Max |x| each target Linear sees (a running max: memory does not grow with the samples); changes nothing."""

    propagate = "before"
    resumable = True

    def __init__(self, targets: dict[str, torch.nn.Module], finish=None):
        self.amax = dict.fromkeys(targets, 0.0)
        self.on_finish = finish  # called with each finished layer's step (the pass swaps its Linears there)

    def record(self, name, x):
        self.amax[name] = max(self.amax[name], float(x.abs().max()))

    distributed = True

    def reduce(self, step):
        from optforge.distributed import all_reduce_float

        for name in step.targets:
            self.amax[name] = all_reduce_float(self.amax[name], "max")

    def layer_results(self, step):
        return {name: torch.tensor(self.amax[name], dtype=torch.float64) for name in step.targets}

    def restore_layer(self, step, results):
        self.amax.update({name: float(v) for name, v in results.items()})

    def finish(self, step):
        if self.on_finish is not None:
            self.on_finish(step, self.amax)


def input_amax(model: torch.nn.Module, linears: dict[str, torch.nn.Module], samples: list[torch.Tensor], *, pass_name: str, progress=None, resume_dir=None,
               placement=None, finish=None) -> dict[str, float]:
    """Max |x| of each Linear's inputs over the samples: layer by layer inside the decoder, and one whole-model
    forward for Linears outside it (an included output head, which then sees every position). `finish(step, amax)` runs
    as each decoder layer is done, while it is still on the compute device (the layer's amax final by then)."""
    from optforge.passes.calibration import calibrate, observe_forward

    if any(not name.startswith("model.layers.") for name in linears):  # (calibrate's decoder layers are model.model.layers)
        finish = None  # a Linear outside the layers is observed through the whole model after them: keep the layers float
    observed = InputAmax(linears, finish)
    inside = calibrate(model, samples, observed, pass_name=pass_name, targets=linears, progress=progress, resume_dir=resume_dir, placement=placement)
    outside = {n: m for n, m in linears.items() if n not in inside}
    if outside:
        from optforge.distributed import all_reduce_float, shard

        observe_forward(model, shard(samples), outside, observed.record)
        for name in outside:
            observed.amax[name] = all_reduce_float(observed.amax[name], "max")
    return observed.amax


@register
class Fp8(Pass):
    name = "quant.fp8"
    version = 1
    Config = Fp8Config
    requires = frozenset({"hf_causal_lm", "float_weights"})
    produces = frozenset({"hf_causal_lm", "quantized_weights", "quantized_activations"})
    removes = frozenset({"float_weights"})

    @property
    def uses_calibration(self) -> bool:
        return not self.config.dynamic  # only static activation scales read the calibration text

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from optforge.formats import replace_linear
        from optforge.passes.calibration import calibration_samples
        from optforge.passes.output import load_input
        from optforge.passes.quant.output import write_quantized
        from optforge.passes.targets import pass_targets

        cfg = self.config
        model, tokenizer = load_input(artifact, ctx, onload=True)  # on the host; layers and weights visit ctx.device
        targets = pass_targets(self.name, model, cfg.include, cfg.exclude)
        started = time.perf_counter()
        report: dict = {"method": "fp8", "strategy": cfg.strategy, "dynamic": cfg.dynamic}
        amax: dict[str, float] = {}
        spec = {"scheme": "fp8", "strategy": cfg.strategy, "dynamic": cfg.dynamic}
        modules = dict.fromkeys(targets, spec)

        def swap(name: str, input_amax: float | None) -> None:  # rounded where the Linear is (a calibrated layer: the device)
            def fill(new, old):
                new.set_float(old.weight.to(ctx.device), input_amax=input_amax)
                new.to(old.weight.device)

            del targets[name]
            replace_linear(model, name, spec, fill)

        def finish(step, found: dict[str, float]) -> None:  # a calibrated layer leaves the device in FP8; a silent Linear stays for the error below
            for name in step.targets:
                if found[name] > 0.0:
                    swap(name, found[name])

        if not cfg.dynamic:
            samples = calibration_samples(self.name, tokenizer, ctx, cfg.num_samples)
            amax = input_amax(model, dict(targets), samples, pass_name=self.name, progress=ctx.progress, resume_dir=ctx.resume_dir, placement=ctx.placement,
                              finish=finish)
            silent = sorted(n for n, v in amax.items() if v <= 0.0)
            if silent:
                raise PassError(self.name, f"{len(silent)} Linear(s) saw no calibration signal (e.g. {silent[0]}): a static scale would be zero; use dynamic: true or more calibration rows")
            report.update(samples=len(samples), input_amax={n: round(v, 4) for n, v in amax.items()})
        for name in list(targets):  # the rest (all, with dynamic scales), each float Linear freed as soon as it is swapped
            swap(name, amax.get(name))
        report["calibration_seconds"] = round(time.perf_counter() - started, 2)
        return write_quantized(model, tokenizer, artifact, self, ctx, modules, report)
