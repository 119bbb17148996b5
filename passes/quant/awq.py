"""AWQ: activation-aware weight-only quantization (Lin et al., 2023, "AWQ").

Input channels that carry large activations matter more, so before rounding each group of Linears that
read the same input is rescaled: W' = W * s (per input channel), and the op that produces that input is
divided by s (an RMSNorm weight, or the rows of `up_proj` for `down_proj`), leaving the float model's
function unchanged. s = mean|x|^alpha, with alpha searched on a grid to minimize the output error of
the quantized Linears on calibration activations. Layer by layer through `calibration.run_layerwise`;
only a bounded sample of each group's input rows is kept. Limits: no weight-clipping search; `o_proj`
is rounded plainly (its input comes from attention, no foldable op with GQA); architectures need a
folding map below, and others fail with an error naming the decoder layer.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from optforge.errors import PassError
from optforge.formats.grid import dequantize, fake_quantize, qparams, quantize
from optforge.pass_ import config, option, register
from optforge.passes.quant.weight_only import WeightOnlyConfig, WeightOnlyPass

log = logging.getLogger(__name__)

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
# model_type -> (op whose output feeds the Linears, Linears fed) inside one decoder layer.
FOLDS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "llama": [("input_layernorm", _QKV), ("post_attention_layernorm", _GATE_UP), ("mlp.up_proj", ("mlp.down_proj",))],
    "gemma3_text": [("input_layernorm", _QKV), ("pre_feedforward_layernorm", _GATE_UP), ("mlp.up_proj", ("mlp.down_proj",))],
}
FOLDS["mistral"] = FOLDS["qwen2"] = FOLDS["llama"]


@config
class AWQConfig(WeightOnlyConfig):
    grid_points: int = option(20, "alpha values tried in [0, 1)")
    max_rows: int = option(4096, "input rows per Linear group kept for the scale search (bounds memory)")
    num_samples: int | None = option(None, "calibration passages used (null: all the recipe's rows)")


def divide_output(op: nn.Module, s: torch.Tensor) -> None:
    """Make `op`'s output channels 1/s of what they were (an RMSNorm or a Linear's rows)."""
    if isinstance(op, nn.Linear):
        op.weight.data /= s.unsqueeze(1)
        if op.bias is not None:
            op.bias.data /= s
    elif "Gemma" in type(op).__name__:  # Gemma RMSNorm multiplies by (1 + weight)
        op.weight.data = (1 + op.weight.data) / s - 1
    elif hasattr(op, "weight") and op.weight is not None and op.weight.shape == s.shape:
        op.weight.data /= s
    else:
        raise PassError("quant.awq", f"cannot fold scales into {type(op).__name__}: no per-channel weight")


def search_scale(linears: list[nn.Linear], grids: list, x: torch.Tensor, x_mean: torch.Tensor, points: int) -> tuple[torch.Tensor, float, float]:
    """Best s (in,) for the Linears reading x (rows, in); returns (s, alpha, relative error vs alpha=0)."""
    ref = [x @ lin.weight.T for lin in linears]
    best = (None, 0.0, float("inf"))
    first = None
    for k in range(points):
        alpha = k / points
        s = x_mean.clamp(min=1e-4) ** alpha
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for lin, grid, y in zip(linears, grids, ref):
            wq = fake_quantize(lin.weight * s, grid) / s
            err += float(((x @ wq.T - y) ** 2).mean())
        first = err if first is None else first
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2] / first if first else 1.0


@register
class AWQ(WeightOnlyPass):
    name = "quant.awq"
    version = 1
    Config = AWQConfig
    uses_calibration = True
    method = "awq"

    def quantize(self, model, tokenizer, targets, grids, ctx):
        from optforge.passes.quant.calibration import calibration_samples, decoder_layers, run_layerwise, watch_inputs

        folds = FOLDS.get(model.config.model_type)
        if folds is None:
            layer = type(decoder_layers(model, self.name)[0]).__name__
            raise PassError(self.name, f"no scale-folding map for architecture '{model.config.model_type}' (decoder layer {layer}); supported: {', '.join(sorted(FOLDS))}. Use quant.gptq or quant.rtn for this model")
        cfg = self.config
        started = time.perf_counter()
        samples = calibration_samples(self.name, tokenizer, ctx, cfg.num_samples)
        rows_per_sample = max(1, cfg.max_rows // len(samples))
        names = {id(m): n for n, m in model.named_modules()}
        alphas: dict[str, float] = {}
        scaled: set[str] = set()

        def visit(index, layer, forward_all):
            prefix = names[id(layer)]
            heads = {op: layer.get_submodule(fed[0]) for op, fed in folds if f"{prefix}.{fed[0]}" in targets}
            kept: dict[str, list] = {op: [] for op in heads}
            sums = {op: torch.zeros(m.in_features, device=m.weight.device) for op, m in heads.items()}
            counts = dict.fromkeys(heads, 0)

            def record(op, x):
                sums[op] += x.abs().sum(0)
                counts[op] += x.shape[0]
                kept[op].append(x[torch.randperm(x.shape[0])[:rows_per_sample]])

            with watch_inputs(heads, record):
                forward_all()
            for op, fed in folds:
                full = [f"{prefix}.{n}" for n in fed]
                if op not in heads or not all(f in targets for f in full) or counts[op] == 0:
                    continue
                linears = [layer.get_submodule(n) for n in fed]
                x = torch.cat(kept.pop(op))
                s, alpha, rel = search_scale(linears, [grids[f] for f in full], x, sums[op] / counts[op], cfg.grid_points)
                divide_output(layer.get_submodule(op), s)
                for lin in linears:
                    lin.weight.data *= s
                alphas[f"{prefix}.{op}"] = alpha
                scaled.update(full)

        run_layerwise(model, samples, visit, pass_name=self.name, progress=ctx.progress)
        results = {}
        for name, linear in targets.items():
            scale, zero = qparams(linear.weight, grids[name])
            results[name] = (quantize(linear.weight, scale, zero, grids[name]), scale, zero)
            linear.weight.data = dequantize(*results[name]).to(linear.weight.dtype)
        report = {
            "method": "awq",
            "samples": len(samples),
            "calibration_seconds": round(time.perf_counter() - started, 2),
            "alphas": alphas,
            # Rounded with no scale search (no foldable op before them, e.g. o_proj): RTN quality.
            "unscaled": sorted(set(targets) - scaled),
        }
        return results, report
