"""KV-cache quantization: per-layer FP8 (E4M3) or INT8 scales for keys and values, recorded for the runtime.

The cache stores K (after RoPE) and V per layer; one symmetric per-tensor scale each, max |K| / qmax, from
the recipe's calibration text run layer by layer (`passes/calibration.py`), as vLLM's and TensorRT-LLM's FP8
KV caches use. The weights are not
touched: the pass copies the model and adds `kv_cache` to optforge.json:
`{"dtype": "fp8" | "int8", "scales": {layer index: {"k": float, "v": float}}, "margin": float}`.
`formats.kv_cache.apply_kv_cache_layout(model, layout["kv_cache"])` makes an HF model read K/V rounded
through those scales, so evals see what serving with the quantized cache sees. Limits: per-tensor scales
only (no per-head); values beyond the calibrated max are clipped (`margin` widens the range); HF
attention modules must carry `layer_idx`, and a layer never reached by calibration is an error.
"""

from __future__ import annotations

import contextlib
import time
from typing import Literal

import torch

from optforge.artifact import ModelArtifact, copy_model_files
from optforge.context import PassContext
from optforge.errors import PassError
from optforge.pass_ import Pass, config, option, register
from optforge.passes.calibration import LayerAlgorithm


@config
class KvCacheConfig:
    dtype: Literal["fp8", "int8"] = option("fp8", "storage type of cached keys and values")
    margin: float = option(1.0, "multiplier (>= 1) on the calibrated max |K|, |V| before it becomes the scale")
    num_samples: int | None = option(None, "calibration passages used (null: all the recipe's rows)")


class KvRange(LayerAlgorithm):
    """Max |K| and |V| of each attention layer, seen inside attention (K after RoPE, as the cache stores it)
    by the observing attention implementation of `formats.kv_cache`; changes nothing."""

    propagate = "before"
    resumable = True

    def __init__(self, attention: dict[int, torch.nn.Module]):
        self.attention = attention
        self.state = {idx: {"observed": (0.0, 0.0)} for idx in attention}

    @contextlib.contextmanager
    def session(self, model):
        from optforge.formats.kv_cache import use_kv_attention

        previous = model.config._attn_implementation
        use_kv_attention(model, self.state)  # before the capture: the masks are built for this implementation
        try:
            yield
        finally:
            for module in self.attention.values():
                module.kv_quant = None
            model.config._attn_implementation = previous

    distributed = True

    def reduce(self, step):
        from optforge.distributed import all_reduce

        for idx in self._inside(step):
            self.state[idx]["observed"] = tuple(float(v) for v in all_reduce(torch.tensor(self.state[idx]["observed"], dtype=torch.float64), "max"))

    def _inside(self, step) -> list[int]:
        modules = {id(m) for m in step.layer.modules()}
        return [idx for idx, module in self.attention.items() if id(module) in modules]

    def layer_results(self, step):
        return {str(idx): torch.tensor(self.state[idx]["observed"], dtype=torch.float64) for idx in self._inside(step)}

    def restore_layer(self, step, results):  # after the replay's forward, which observed the same values again
        for idx in self._inside(step):
            self.state[idx]["observed"] = tuple(float(v) for v in results[str(idx)])


def calibrate_kv(model: torch.nn.Module, samples: list[torch.Tensor], *, pass_name: str = "quant.kv_cache", progress=None, resume_dir=None,
                 placement=None) -> dict[int, tuple[float, float]]:
    """{layer index: (max |K|, max |V|)} over the samples, K after RoPE as the cache stores it."""
    from optforge.formats.kv_cache import attention_layers
    from optforge.passes.calibration import calibrate

    kv = KvRange(attention_layers(model))
    calibrate(model, samples, kv, pass_name=pass_name, progress=progress, resume_dir=resume_dir, placement=placement)
    return {idx: s["observed"] for idx, s in kv.state.items()}


@register
class KvCacheQuant(Pass):
    name = "quant.kv_cache"
    version = 1
    Config = KvCacheConfig
    requires = frozenset({"hf_causal_lm"})
    produces = frozenset({"quantized_kv_cache"})
    uses_calibration = True

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from optforge.formats.kv_cache import KV_QMAX, attention_layers
        from optforge.passes.calibration import calibration_samples
        from optforge.passes.output import load_input, write_output

        cfg = self.config
        if cfg.margin < 1.0:
            raise PassError(self.name, f"margin must be >= 1 (it widens the calibrated range), found {cfg.margin}")
        started = time.perf_counter()
        model, tokenizer = load_input(artifact, ctx, fused=True, onload=True)  # calibrated as it will be served
        if not attention_layers(model):
            raise PassError(self.name, f"{type(model).__name__} has no attention modules with `layer_idx` and `k_proj`; KV-cache quantization supports HF decoder-only attention")
        samples = calibration_samples(self.name, tokenizer, ctx, cfg.num_samples)
        observed = calibrate_kv(model, samples, pass_name=self.name, progress=ctx.progress, resume_dir=ctx.resume_dir, placement=ctx.placement)
        silent = sorted(idx for idx, (k, v) in observed.items() if k <= 0.0 or v <= 0.0)
        if silent:
            raise PassError(self.name, f"attention layers {silent} saw no calibration signal; a zero KV scale would be wrong. Add calibration rows")
        qmax = KV_QMAX[cfg.dtype]
        scales = {str(idx): {"k": k * cfg.margin / qmax, "v": v * cfg.margin / qmax} for idx, (k, v) in sorted(observed.items())}
        copy_model_files(artifact.path, ctx.output_dir)
        kv = {"dtype": cfg.dtype, "margin": cfg.margin, "scales": scales, "calibration_seconds": round(time.perf_counter() - started, 2)}
        return write_output(artifact, self, ctx, records={"kv_cache": kv})
