"""INT8 weight-only quantization, symmetric, one scale per output channel, round-to-nearest (RTN).

For each selected Linear with weight W (out, in): s = max|W[o, :]| / 127, q = clamp(round(W / s), -127, 127)
(`optforge.formats.int8.quantize_rows_int8`; an all-zero row gets s = 1). The artifact stores q as int8 and s
as float32 (out, 1), the same tensors a compressed-tensors "int-quantized" channel-wise checkpoint holds. The
runtime runs them with an int8 weight-only matmul (`optforge.formats.int8.Int8WeightOnlyLinear`). Limits: no
calibration, so outlier channels are not protected; `lm_head` stays in full precision by default (it is tied
to the embeddings in many models).
"""

from __future__ import annotations

from optforge.artifact import ModelArtifact
from optforge.context import PassContext
from optforge.pass_ import Pass, config, option, register


@config
class Int8WeightOnlyConfig:
    include: tuple[str, ...] = option((r".*",), "regexes (re.search) of Linear names to quantize")
    exclude: tuple[str, ...] = option((r"(^|\.)lm_head$",), "regexes of Linear names kept in full precision; wins over include")


@register
class Int8WeightOnly(Pass):
    name = "quant.int8_weight_only"
    version = 2  # 2: writes the compressed-tensors quantization_config and the precision table
    Config = Int8WeightOnlyConfig
    requires = frozenset({"hf_causal_lm", "float_weights"})
    produces = frozenset({"hf_causal_lm", "quantized_weights"})
    removes = frozenset({"float_weights"})

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from optforge.formats import swap_linear
        from optforge.passes.output import load_input
        from optforge.passes.quant.output import write_quantized
        from optforge.passes.targets import pass_targets

        model, tokenizer = load_input(artifact, ctx, onload=True)
        targets = pass_targets(self.name, model, self.config.include, self.config.exclude)
        spec = {"scheme": "int8_weight_only", "bits": 8, "symmetric": True, "granularity": "channel"}
        advance = ctx.progress("int8 weight-only", len(targets))
        modules = dict.fromkeys(targets, spec)
        for name in list(targets):  # each float Linear freed as soon as it is swapped
            linear = targets.pop(name)
            module = swap_linear(model, name, spec)
            module.set_float(linear.weight.to(ctx.device))  # rounded on the device, kept on the host
            module.to("cpu")
            advance(1)
        return write_quantized(model, tokenizer, artifact, self, ctx, modules, {"method": "rtn", "calibrated": False})
