"""NVIDIA ModelOpt's own calibration algorithms under optforge's gates (`quant.modelopt`).

Runs `modelopt.torch.quantization.quantize(model, <config>, forward_loop)` (ModelOpt's max calibration or
AWQ-lite) on the recipe's calibration passages, then reads each Linear's calibrated quantizers (`amax`, AWQ's
`pre_quant_scale`) and writes optforge's own quantized modules, so the output is an ordinary optforge artifact
that evals, gates, the runtime and the exports read. ModelOpt config -> optforge module (method
"modelopt-<algorithm>" in the precision table):
- FP8_DEFAULT_CFG -> `Fp8Linear` per tensor, static per-tensor activations; FP8_PER_CHANNEL_PER_TOKEN_CFG ->
  `Fp8Linear` per channel, dynamic per-token activations. ModelOpt's fake quant scales by 448 / amax and divides
  it back (`tensor_quant._fp8_eager`): the codes are E4M3(w * 448 / amax), weight_scale and input_scale
  1 / (448 / amax) (its export writes amax / 448: the same within a float32 ulp).
- INT8_WEIGHT_ONLY_CFG -> `Int8WeightOnlyLinear` per channel; INT4_BLOCKWISE_WEIGHT_ONLY_CFG (max) and
  INT4_AWQ_CFG (AWQ-lite) -> `WeightOnlyLinear` int4 symmetric group-wise. Codes round(w * qmax / amax) clamped
  to [-2^(b-1), 2^(b-1) - 1] (`tensor_quant._tensor_quant`). ModelOpt pads a last short block (576 columns at
  block 128); optforge writes group gcd(block, in_features) with each block's scale repeated: the same numbers.
AWQ-lite leaves every Linear its own `pre_quant_scale` (x * s before the Linear). optforge's int4 Linear has no
input scale, so the scales are folded into the op ahead with ModelOpt's own export transforms: Linears reading one
op's output (q/k/v, gate/up) are re-smoothed to the mean of their scales, re-calibrated and the mean folded into
the norm (`requantize_resmooth_fused_llm_layers`, as its INT4 AWQ export does); down_proj's scale goes into
up_proj's rows (exact: the codes stay) and o_proj's into v_proj's rows, averaged over the query heads sharing a KV
head under GQA (`fuse_prequant_to_linear(fuse_grouped_heads=True)`; its INT4 export instead keeps these two scales
for TensorRT-LLM to apply). The report lists the re-smoothed Linears. On SmolLM2 (8 calibration passages, BoolQ
rows 0-40) the raw fake-quant model scores perplexity 29.70, the folded one 30.67, and ModelOpt's export's form
(o_proj and down_proj keeping their scales) 30.69: the cost is the q/k/v and gate/up re-smoothing. Every written
Linear equals the folded ModelOpt model's fake-quant Linear; the pass checks each before it writes (weights and,
for FP8, outputs on a probe input) and refuses if not.
Refused while the recipe is validated (`REFUSED`): INT8_DEFAULT_CFG and INT8_SMOOTHQUANT_CFG (static per-tensor
INT8 activations; optforge's W8A8Linear quantizes each token at run time, other numerics), W4A8, NVFP4/MX
formats, 2D-block FP8, KV-cache configs. Limits: the whole model sits on `--device` during calibration (ModelOpt's
forward loop; no layer onloading, no resume, no distributed calibration); AWQ needs a folding map
(`folding.FOLDS`); exercised on CPU only (ModelOpt's CUDA kernels not run here); modelopt is imported inside
`run`, so recipes validate without it and a build without it stops with exit 2 (pip install 'optforge[modelopt]').
"""

from __future__ import annotations

import copy
import glob
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from optforge.artifact import ModelArtifact
from optforge.context import PassContext
from optforge.errors import MissingDependencyError, PassError, suggest
from optforge.pass_ import Pass, config, option, register
from optforge.passes.quant.modelopt_fold import fold_groups, fold_pre_quant_scales, pre_quant_scale

log = logging.getLogger(__name__)

NAME = "quant.modelopt"
INSTALL = "pip install 'optforge[modelopt]'"
# ModelOpt config name -> what its quantized Linears become.
SUPPORTED = {
    "FP8_DEFAULT_CFG": "fp8 e4m3 per tensor, static per-tensor activations",
    "FP8_PER_CHANNEL_PER_TOKEN_CFG": "fp8 e4m3 per channel, dynamic per-token activations",
    "INT4_AWQ_CFG": "int4 symmetric group-wise (ModelOpt's block, 128), AWQ-lite scales folded",
    "INT4_BLOCKWISE_WEIGHT_ONLY_CFG": "int4 symmetric group-wise (ModelOpt's block, 128), max calibration",
    "INT8_WEIGHT_ONLY_CFG": "int8 per channel, weight-only",
}
# Configs whose calibration reads activations (static input scales, AWQ's search); the others need no forward.
READS_ACTIVATIONS = frozenset({"FP8_DEFAULT_CFG", "INT4_AWQ_CFG"})
_STATIC_INT8 = ("its INT8 activations use one static per-tensor scale from calibration, while optforge's W8A8 (W8A8Linear) "
                "quantizes each token's activations at run time: the numerics differ. quant.smoothquant writes optforge's W8A8")
REFUSED = {
    "INT8_DEFAULT_CFG": _STATIC_INT8,
    "INT8_SMOOTHQUANT_CFG": _STATIC_INT8,
    "W4A8_AWQ_BETA_CFG": "INT4 weights with FP8 activations: optforge has no W4A8 module",
    "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG": "FP8 weights in 2D blocks without quantized activations: optforge's Fp8Linear has per-tensor or per-channel scales",
}
REFUSED_PREFIXES = {
    ("NVFP4", "W4A16_NVFP4", "W4A8_NVFP4", "MAMBA_MOE_NVFP4"): "NVFP4 (E2M1 values, E4M3 block scales): optforge has no FP4 module",
    ("MX", "W4A8_MXFP4"): "an OCP microscaling (MX) format: optforge has no MX module",
    ("MAMBA_MOE_FP8",): "a Mamba/MoE preset: use FP8_DEFAULT_CFG",
}
KV_REASON = "a KV-cache config, merged with a weight config inside ModelOpt: use quant.kv_cache for a quantized KV cache"


def refusal(name: str) -> str | None:
    """Why the ModelOpt config `name` cannot be written as optforge modules, naming the supported ones (None: it can)."""
    if name in SUPPORTED:
        return None
    supported = f"Supported: {', '.join(SUPPORTED)}"
    why = REFUSED.get(name) or (KV_REASON if "_KV_" in f"_{name}" else None)
    why = why or next((reason for prefixes, reason in REFUSED_PREFIXES.items() if name.startswith(prefixes)), None)
    if why:
        return f"ModelOpt config '{name}' is not supported by {NAME}: {why}. {supported}"
    return f"unknown ModelOpt config '{name}'.{suggest(name, SUPPORTED)} {supported}"


@config
class ModelOptConfig:
    config: str = option("FP8_DEFAULT_CFG", f"ModelOpt config, by its name in modelopt.torch.quantization: {', '.join(SUPPORTED)}")
    include: tuple[str, ...] = option((r".*",), "regexes (re.search) of Linear names ModelOpt may quantize (its config may leave more float)")
    exclude: tuple[str, ...] = option((r"(^|\.)lm_head$",), "regexes of Linear names kept in full precision; wins over include")
    num_samples: int | None = option(None, "calibration passages (null: all the recipe's rows); read by FP8_DEFAULT_CFG and INT4_AWQ_CFG only")
    block_size: int | None = option(None, "INT4 configs: input columns per weight scale instead of the config's 128 (null: the config's), e.g. 64 for a model whose widths are not multiples of 128, which ModelOpt's own export refuses")

    def __post_init__(self):
        if self.block_size is not None and (self.block_size < 8 or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size must be a power of two >= 8 or null, found {self.block_size}")
        problem = refusal(self.config)
        if problem:
            raise ValueError(problem)


def import_modelopt():
    """(modelopt's version, modelopt.torch.quantization), or MissingDependencyError (exit 2) naming the install."""
    try:
        import modelopt
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise MissingDependencyError("nvidia-modelopt", f"the `{NAME}` pass (NVIDIA ModelOpt's calibration algorithms)", INSTALL) from exc
    return modelopt.__version__, mtq


def modelopt_config(mtq, name: str, keep_float: list[str], block_size: int | None = None) -> dict:
    """ModelOpt's config `name` with the quantizers of the Linears outside the pass's targets disabled (and the
    INT4 weight block set to `block_size`, where given)."""
    cfg = copy.deepcopy(getattr(mtq, name))
    for entry in cfg["quant_cfg"] if block_size else ():
        inner = entry.get("cfg")
        if isinstance(inner, dict) and inner.get("num_bits") == 4 and inner.get("block_sizes"):
            inner["block_sizes"] = {**inner["block_sizes"], -1: block_size}
    # Entries apply in order, later ones winning; ModelOpt matches quantizer names with fnmatch.
    cfg["quant_cfg"] = [*cfg["quant_cfg"], *({"quantizer_name": f"{glob.escape(n)}.*", "enable": False} for n in keep_float)]
    return cfg


def algorithm(cfg: dict) -> str:
    algo = cfg.get("algorithm") or "max"
    return algo if isinstance(algo, str) else algo.get("method", "max")


def calibrate(mtq, model: nn.Module, name: str, samples: list[torch.Tensor], keep_float: list[str], progress=None, block_size: int | None = None) -> dict:
    """Run ModelOpt's quantize in place (its forward loop over `samples`, or none for configs that read no
    activations); returns the config it ran."""
    from optforge.passes.calibration import calibration_forward

    cfg = modelopt_config(mtq, name, keep_float, block_size)
    loop = None
    if name in READS_ACTIVATIONS:
        advance = (progress or (lambda desc, total: (lambda n=1: None)))(f"ModelOpt {name}", len(samples) * (2 if algorithm(cfg) == "awq_lite" else 1))

        def loop(m):  # AWQ-lite calls it twice: statistics, then the scale search
            for ids in samples:
                calibration_forward(m, ids)
                advance(1)

    with torch.no_grad():
        mtq.quantize(model, cfg, loop)
    return cfg


# ------------------------------------------------------------------ calibrated quantizers -> optforge modules

FP8_MAX = 448.0
TINY_AMAX = 1.0 / (1 << 24)  # ModelOpt treats an amax at or below this as zero


@dataclass
class Converted:
    """One Linear in optforge's form: its module spec and the tensors its buffers take (on the host)."""

    spec: dict
    codes: torch.Tensor  # (out, in): float8_e4m3fn, or int8 integers
    scale: torch.Tensor  # weight_scale in the module's shape
    input_scale: torch.Tensor | None = None  # (1,) static FP8 activations
    bias: torch.Tensor | None = None


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt's FP8 multiplier 448 / amax (`tensor_quant._fp8_eager`; a Python dividend, as there, so the same
    float32 bits); an amax at or below TINY_AMAX counts as 1."""
    return FP8_MAX / torch.where(amax <= TINY_AMAX, torch.ones_like(amax), amax)


def fp8_codes(w: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 codes, weight_scale): w * (448 / amax) saturated and cast, and back as codes * 1 / (448 / amax)."""
    scale = fp8_scale(amax)
    return (w * scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), 1.0 / scale


def int_codes(w: torch.Tensor, amax: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (out, in) int8, step (out * blocks, 1)) as ModelOpt's `_tensor_quant` computes them over its blocks of
    `block` columns (the last one zero-padded): q = clamp(round(w * qmax / amax), -qmax - 1, qmax)."""
    out, cols = w.shape
    qmax = (1 << (bits - 1)) - 1
    blocks = F.pad(w, (0, (-cols) % block)).reshape(-1, block)  # ModelOpt's block layout, row-major
    amax = amax.reshape(-1, 1)
    if amax.shape[0] != blocks.shape[0]:
        raise ValueError(f"{amax.shape[0]} amax values for {blocks.shape[0]} blocks of {block}")
    zero = amax <= TINY_AMAX
    # A tensor dividend, as ModelOpt divides: `qmax / amax` with a Python qmax multiplies by 1 / amax instead, one ulp
    # off, and flips exact ties (SmolLM2's Q4_1-born weights have them: w * 7 / amax = -3.5).
    scale = torch.where(zero, torch.zeros_like(amax), amax.new_tensor(float(qmax)) / amax)
    q = torch.clamp(torch.round(blocks * scale), -qmax - 1, qmax).to(torch.int8)
    return q.reshape(out, -1)[:, :cols], torch.where(zero, torch.ones_like(scale), 1.0 / scale)


def read_linear(name: str, linear: nn.Module, method: str, pass_name: str) -> Converted | None:
    """Linear `name` of the calibrated ModelOpt model in optforge's form (None: ModelOpt left it float);
    PassError for a quantizer set-up that no optforge module runs."""
    wq, iq = linear.weight_quantizer, linear.input_quantizer
    found = f"module '{name}': ModelOpt quantized it as weights {wq}, inputs {iq}"
    if not wq.is_enabled:
        if iq.is_enabled:
            raise PassError(pass_name, f"{found}: quantized inputs with float weights have no optforge module")
        return None
    bits = getattr(wq, "num_bits", None)
    if getattr(wq, "amax", None) is None or getattr(wq, "_unsigned", False) or pre_quant_scale(linear) is not None:
        raise PassError(pass_name, f"{found}: expected a calibrated signed weight quantizer with no pre_quant_scale left")
    w, amax = linear.weight.detach().float(), wq.amax.detach().float()
    out, cols = w.shape
    per_channel = tuple(amax.shape) == (out, 1)
    bias = None if linear.bias is None else linear.bias.detach().cpu().clone()
    if bits == (4, 3) and iq.is_enabled and iq.num_bits == (4, 3) and not wq.block_sizes and (per_channel or amax.numel() == 1):
        dynamic = bool(iq._dynamic)
        if not dynamic and (iq.amax is None or iq.amax.numel() != 1):
            raise PassError(pass_name, f"{found}: static FP8 activations need one per-tensor amax")
        codes, scale = fp8_codes(w, amax)
        input_scale = None if dynamic else (1.0 / fp8_scale(iq.amax.detach().float().reshape(1))).cpu()
        spec = {"scheme": "fp8", "strategy": "channel" if per_channel else "tensor", "dynamic": dynamic, "method": method}
        return Converted(spec, codes.cpu(), scale.reshape(out, 1).cpu() if per_channel else scale.reshape(1).cpu(), input_scale, bias)
    if bits in (4, 8) and not iq.is_enabled and (wq.block_sizes or per_channel):
        block = cols if not wq.block_sizes else wq.block_sizes.get(-1)
        if not isinstance(block, int) or set(wq.block_sizes or {}) - {-1, "type"} or (wq.block_sizes or {}).get("type", "static") != "static":
            raise PassError(pass_name, f"{found}: only static blocks along the input dimension have an optforge form")
        q, step = int_codes(w, amax, bits, block)
        if bits == 8 and not wq.block_sizes:
            spec = {"scheme": "int8_weight_only", "bits": 8, "symmetric": True, "granularity": "channel", "method": method}
            return Converted(spec, q.cpu(), step.reshape(out, 1).cpu(), bias=bias)
        group = math.gcd(block, cols) if wq.block_sizes else None  # optforge's groups divide in_features
        scale = step.reshape(out, -1).repeat_interleave(block // group, dim=1)[:, : cols // group] if group else step.reshape(out, 1)
        spec = {"scheme": "weight_only", "method": method, "bits": bits, "group_size": group, "symmetric": True, "full_range": False}
        return Converted(spec, q.cpu(), scale.contiguous().cpu(), bias=bias)
    raise PassError(pass_name, f"{found}: no optforge module runs this combination (supported configs: {', '.join(SUPPORTED)})")


def fill(module: nn.Module, c: Converted) -> None:
    """Put `c`'s tensors into a freshly swapped optforge module."""
    if c.spec["scheme"] == "weight_only":
        module.set_quantized(c.codes, c.scale, None)
    else:
        module.weight, module.weight_scale = c.codes, c.scale
        if c.input_scale is not None:
            module.input_scale = c.input_scale
    if c.bias is not None:
        module.bias = nn.Parameter(c.bias.to(module.bias.dtype), requires_grad=False)


def conversion_error(linear: nn.Module, c: Converted) -> tuple[float, float | None]:
    """(relative weight error, relative output error for FP8) of the optforge module of `c` against the ModelOpt
    Linear's fake quant, in float32 on the host; the output on a seeded probe input that exercises per-token scales."""
    from optforge.formats import SCHEMES

    module = SCHEMES[c.spec["scheme"]](linear.in_features, linear.out_features, False, c.spec)
    fill(module, Converted(c.spec, c.codes, c.scale, c.input_scale))
    with torch.no_grad():
        ref_w = linear.weight_quantizer(linear.weight.detach().float().cpu())
        ours_w = module.dequantized() if c.spec["scheme"] == "weight_only" else module.weight.float() * module.weight_scale.reshape(-1, 1)
        weight_err = float((ours_w - ref_w).abs().max() / ref_w.abs().max().clamp(min=1e-30))
        if c.spec["scheme"] != "fp8":
            return weight_err, None
        gen = torch.Generator().manual_seed(0)
        # (1, T, in) like the model's inputs (ModelOpt fixes a dynamic quantizer's axes on its first call); rows of different sizes
        x = torch.randn(1, 8, linear.in_features, generator=gen) * torch.logspace(-2, 1, 8).unsqueeze(1)
        if not c.spec["dynamic"]:
            x = x / x.abs().max() * float(linear.input_quantizer.amax) * 1.1  # up to just past the calibrated range (saturates)
        ref = linear.input_quantizer(x) @ ref_w.T
        out_err = float((module(x) - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
    return weight_err, out_err


# ------------------------------------------------------------------ the pass

# Largest relative error of a written Linear against ModelOpt's fake quant (float32 rounding only: the codes are
# ModelOpt's; an E4M3 tie that rounds the other way in the probe moves one product by one step).
MAX_WEIGHT_ERROR = 1e-5
MAX_OUTPUT_ERROR = 1e-3


@register
class ModelOptQuant(Pass):
    name = NAME
    version = 1
    Config = ModelOptConfig
    requires = frozenset({"hf_causal_lm", "float_weights"})
    produces = frozenset({"hf_causal_lm", "quantized_weights"})
    removes = frozenset({"float_weights"})

    def __init__(self, config: ModelOptConfig):
        super().__init__(config)
        if config.config.startswith("FP8"):
            self.produces = type(self).produces | {"quantized_activations"}

    @property
    def uses_calibration(self) -> bool:
        return self.config.config in READS_ACTIVATIONS

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from optforge.passes.calibration import calibration_samples
        from optforge.passes.output import load_input
        from optforge.passes.targets import pass_targets, select_linears

        version, mtq = import_modelopt()  # before anything loads: exit 2 naming the install
        cfg = self.config
        model, tokenizer = load_input(artifact, ctx)  # whole, on the device: ModelOpt's forward loop runs the model
        targets = pass_targets(self.name, model, cfg.include, cfg.exclude)
        keep_float = sorted(set(select_linears(model, (r".*",), ())) - set(targets))
        awq = cfg.config == "INT4_AWQ_CFG"
        if awq:
            fold_groups(model, self.name)  # an architecture without a folding map fails before calibrating
        samples = calibration_samples(self.name, tokenizer, ctx, cfg.num_samples) if self.uses_calibration else []
        started = time.perf_counter()
        ran = calibrate(mtq, model, cfg.config, samples, keep_float, ctx.progress, cfg.block_size)
        method = f"modelopt-{algorithm(ran)}"
        report: dict = {"method": method, "modelopt_version": version, "config": cfg.config, "algorithm": algorithm(ran), "written_as": SUPPORTED[cfg.config],
                        "samples": len(samples), "calibration_tokens": sum(int(s.shape[1]) for s in samples)}
        folds = fold_pre_quant_scales(model, self.name) if awq else {"changed_float": []}
        converted = self._convert(model, targets, method, report)
        if awq:
            report.update(folded=folds["folded"], resmoothed=folds["resmoothed"])
        report["calibration_seconds"] = round(time.perf_counter() - started, 2)
        changed = {f"{m}.{k}": p.detach().cpu().clone() for m in folds["changed_float"] if m not in converted
                   for k, p in model.get_submodule(m).named_parameters(recurse=False)}
        del model  # ModelOpt's module classes and quantizers stay out of the artifact: a clean float model takes the tensors
        return self._write(artifact, ctx, converted, changed, report)

    def _convert(self, model: nn.Module, targets: dict, method: str, report: dict) -> dict[str, Converted]:
        """Every target in optforge's form, each checked against ModelOpt's fake quant; fills the report."""
        converted, weight_err, out_err = {}, 0.0, 0.0
        for name in targets:
            linear = model.get_submodule(name)
            c = read_linear(name, linear, method, self.name)
            if c is None:
                continue
            w_err, o_err = conversion_error(linear, c)
            if w_err > MAX_WEIGHT_ERROR or (o_err or 0.0) > MAX_OUTPUT_ERROR:
                raise PassError(self.name, f"module '{name}': optforge's {c.spec['scheme']} form differs from ModelOpt's fake quant by {w_err:.3g} (weights), "
                                           f"{o_err or 0.0:.3g} (outputs), relative; refusing to write numerics other than ModelOpt's")
            converted[name] = c
            weight_err, out_err = max(weight_err, w_err), max(out_err, o_err or 0.0)
        stray = sorted(n for n, m in model.named_modules() if n.endswith("_quantizer") and getattr(m, "is_enabled", False) and n.rpartition(".")[0] not in converted)
        if stray:
            raise PassError(self.name, f"ModelOpt's {self.config.config} quantizes '{stray[0]}' ({len(stray)} quantizers outside the converted Linears), which optforge cannot write")
        if not converted:
            raise PassError(self.name, f"ModelOpt's {self.config.config} quantized none of the {len(targets)} target Linear(s)")
        static = {n: round(float(model.get_submodule(n).input_quantizer.amax), 4) for n, c in converted.items() if c.spec["scheme"] == "fp8" and not c.spec["dynamic"]}
        report.update(left_float=sorted(set(targets) - set(converted)), max_weight_error=weight_err, max_output_error=out_err if out_err else None)
        if static:
            report["input_amax"] = static
        return converted

    def _write(self, artifact: ModelArtifact, ctx: PassContext, converted: dict[str, Converted], changed: dict[str, torch.Tensor], report: dict) -> ModelArtifact:
        from optforge.formats import swap_linear
        from optforge.passes.output import load_input
        from optforge.passes.quant.output import write_quantized

        model, tokenizer = load_input(artifact, ctx, onload=True)
        with torch.no_grad():
            for name, value in changed.items():  # folded norms (and float Linears reading a folded output)
                model.get_parameter(name).copy_(value)
        modules = {}
        for name in list(converted):  # each float Linear freed as soon as it is swapped
            c = converted.pop(name)
            fill(swap_linear(model, name, c.spec), c)
            modules[name] = c.spec
        log.info("%s: %s (%s) wrote %d Linears as optforge modules", self.name, report["config"], report["method"], len(modules))
        return write_quantized(model, tokenizer, artifact, self, ctx, modules, report)
