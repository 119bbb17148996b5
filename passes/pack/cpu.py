"""pack.cpu: write the engine of the C++ runtime (`runtime/cpp`): weights pre-packed for its CPU kernels.

Each decoder Linear is stored as fp32 (`<name>.weight`) or in the kernels' block format: blocks of 32 input
columns with one IEEE fp16 scale each, `<name>.qweight` int8 (out, in) or, for int4, uint8 (out, in / 2) where
byte j of a block holds column j in its low nibble and column j + 16 in its high nibble (values + 8), and
`<name>.qscales` float16 (out, in / 32). The tied `lm_head` gets its own packed copy (the embedding lookup
stays fp32), as llama.cpp does. Quantization is symmetric round-to-nearest per block (the Q8_0 / Q4_0 grids
of llama.cpp): each block's scale amax / qmax is rounded to fp16 first and the weights are quantized with that
rounded scale, so the stored scale is the one they were fit to. Where the input already holds quantized
weights on a compatible grid (per-channel int8 from `quant.int8_weight_only`, symmetric int4 with a group size
that divides by 32) the integers are kept and only the scales are rounded to fp16 (relative change <= 2^-11
in fp16's normal range; a scale that would underflow to 0 or overflow falls back to re-quantizing).

Format "optforge-cpu/2" (safetensors metadata `format`, and `cpu_pack.format` in optforge.json). Version 1 had
float32 scales (36 bytes per 32 int8 weights instead of 34, 20 instead of 18 for int4); the C++ runtime still
loads it, rounding those scales to fp16 at load. The packing math runs on the build's device (the same bits on
any); `model.dtype` does not apply: no model runs here, and the engine's floats are fp32, what the C++ runtime
computes in. Limits: asymmetric int4 inputs are dequantized and re-quantized symmetric (lossy); Llama-family
names only.
"""

from __future__ import annotations

import re
import shutil
from typing import Literal

import torch

from optforge.artifact import LAYOUT_FILE, WEIGHTS_FILE, ModelArtifact
from optforge.context import PassContext
from optforge.errors import PassError
from optforge.pass_ import Pass, config, option, register

BLOCK = 32
PACK_FORMAT = "optforge-cpu/2"
_LINEAR = re.compile(r"^(model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)|lm_head)$")


@config
class CpuPackConfig:
    weights: Literal["fp32", "int8", "int4"] = option("int8", "format of the decoder Linear layers in the engine")
    lm_head: Literal["fp32", "int8", "int4"] = option("int8", "format of the output projection (its own copy when tied)")


def _block_scales_f16(blocks: torch.Tensor, qmax: float) -> torch.Tensor:
    """fp16 scales amax / qmax of (out, nb, 32) float blocks, rounded before use; 1 where that is 0 (an
    all-zero block, or one whose scale underflows fp16: its weights then quantize to 0)."""
    amax = blocks.abs().amax(dim=-1)
    # A divisor on the blocks' device: CUDA turns division by a Python number into a multiplication by its
    # reciprocal (1 ulp off), and the engine must hold the same bits wherever it was packed.
    scale = (amax / amax.new_tensor(qmax)).half()
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"a block's scale overflows fp16 (|w| > {65504 * qmax:.3g}); pack this layer as fp32")
    return torch.where(scale > 0, scale, torch.ones_like(scale)).contiguous()


def pack_int8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 (out, in) in [-127, 127] and float16 scales (out, in / 32)."""
    blocks = w.detach().float().reshape(w.shape[0], -1, BLOCK)
    scale = _block_scales_f16(blocks, 127.0)
    q = torch.clamp(torch.round(blocks / scale.float().unsqueeze(-1)), -127, 127).to(torch.int8)
    return q.reshape(w.shape).contiguous(), scale


def quantize_int4_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 values in [-8, 7] (out, in) and float16 scales (out, in / 32)."""
    blocks = w.detach().float().reshape(w.shape[0], -1, BLOCK)
    scale = _block_scales_f16(blocks, 7.0)
    q = torch.clamp(torch.round(blocks / scale.float().unsqueeze(-1)), -8, 7).to(torch.int8)
    return q.reshape(w.shape), scale


def nibble_pack(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] (out, in) -> uint8 (out, in / 2) in the kernels' low/high-half block layout."""
    u = (q.to(torch.int16) + 8).reshape(q.shape[0], -1, 2, BLOCK // 2)  # (out, blocks, half, 16)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).to(torch.uint8).reshape(q.shape[0], -1).contiguous()


def nibble_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `nibble_pack`."""
    u = packed.reshape(packed.shape[0], -1, BLOCK // 2).to(torch.int16)
    return (torch.stack([u & 0xF, u >> 4], dim=2) - 8).reshape(packed.shape[0], -1).to(torch.int8)


def dequantize_packed(qweight: torch.Tensor, qscales: torch.Tensor) -> torch.Tensor:
    """Float (out, in) weights of a packed Linear (the reference the C++ kernels are tested against)."""
    q = qweight if qweight.dtype == torch.int8 else nibble_unpack(qweight)
    return (q.float().reshape(q.shape[0], -1, BLOCK) * qscales.float().unsqueeze(-1)).reshape(q.shape)


def _source_linear(state: dict, name: str, spec: dict | None) -> tuple[torch.Tensor | None, tuple | None]:
    """(float weight or None, exact (bits, q, per-block scales) or None) of one Linear of the input."""
    if spec is None:
        return state[f"{name}.weight"].float(), None
    bits, group = spec.get("bits"), spec.get("group_size")
    scale = state[f"{name}.weight_scale"].float()
    if bits == 8 and spec.get("symmetric", True) and scale.shape[1] == 1:
        q = state[f"{name}.weight"]
        return None, (8, q, scale.expand(q.shape[0], q.shape[1] // BLOCK).contiguous())
    from optforge.formats.grid import dequantize
    from optforge.formats.packing import unpack_int4

    q = unpack_int4(state[f"{name}.weight_packed"]) if bits == 4 else state[f"{name}.weight"]
    zero = state.get(f"{name}.weight_zero_point")
    if zero is not None and bits == 4:
        zero = unpack_int4(zero.to(torch.int32), dim=0)
    if bits == 4 and zero is None and group and group % BLOCK == 0:
        return None, (4, q, scale.repeat_interleave(group // BLOCK, dim=1).contiguous())
    return dequantize(q, scale, zero), None


def _pack(name: str, weight: torch.Tensor | None, exact: tuple | None, fmt: str, out: dict) -> None:
    if exact is not None and fmt == ("int8" if exact[0] == 8 else "int4"):
        bits, q, scales = exact
        half = scales.half()
        if bool(torch.isfinite(half).all()) and bool((half != 0).all()):  # else re-quantize below
            out[f"{name}.qweight"] = q.to(torch.int8).contiguous() if bits == 8 else nibble_pack(q)
            out[f"{name}.qscales"] = half.contiguous()
            return
    if weight is None:
        weight = dequantize_packed(exact[1].to(torch.int8) if exact[0] == 8 else nibble_pack(exact[1]), exact[2])
    if fmt == "fp32":
        out[f"{name}.weight"] = weight.float().contiguous()
    elif fmt == "int8":
        out[f"{name}.qweight"], out[f"{name}.qscales"] = pack_int8_blocks(weight)
    else:
        q, scales = quantize_int4_blocks(weight)
        out[f"{name}.qweight"], out[f"{name}.qscales"] = nibble_pack(q), scales


@register
class CpuPack(Pass):
    name = "pack.cpu"
    version = 2  # optforge-cpu/2: fp16 block scales
    Config = CpuPackConfig
    requires = frozenset({"hf_causal_lm"})
    produces = frozenset({"hf_causal_lm", "cpu_packed"})
    removes = frozenset({"float_weights"})

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from safetensors.torch import load_file, save_file

        from optforge.passes.output import write_output

        modules = artifact.quantized_modules
        state = load_file(artifact.path / WEIGHTS_FILE, device=ctx.device)
        names = sorted({k.rsplit(".", 1)[0] for k in state if _LINEAR.match(k.rsplit(".", 1)[0])} | {"lm_head"})
        out: dict[str, torch.Tensor] = {}
        advance = ctx.progress("pack for the C++ runtime", len(names))
        for name in names:
            fmt = self.config.lm_head if name == "lm_head" else self.config.weights
            if name == "lm_head" and "lm_head.weight" not in state and "lm_head.weight_packed" not in state:
                weight, exact = state["model.embed_tokens.weight"].float().clone(), None  # tied: its own copy, not a view
            else:
                weight, exact = _source_linear(state, name, modules.get(name))
            in_features = (weight if weight is not None else exact[1]).shape[1]
            if fmt != "fp32" and in_features % BLOCK:
                raise PassError(self.name, f"{name}: in_features {in_features} does not divide by {BLOCK}; use weights: fp32")
            try:
                _pack(name, weight, exact, fmt, out)
            except ValueError as err:
                raise PassError(self.name, f"{name}: {err}") from err
            advance(1)
        for key, value in state.items():
            if not _LINEAR.match(key.rsplit(".", 1)[0]):
                out[key] = value.float().contiguous() if value.is_floating_point() else value
        for item in artifact.path.iterdir():
            if item.is_file() and item.name not in (WEIGHTS_FILE, LAYOUT_FILE, "manifest.json"):
                shutil.copy2(item, ctx.output_dir / item.name)
        save_file({key: value.cpu() for key, value in out.items()}, ctx.output_dir / WEIGHTS_FILE, metadata={"format": PACK_FORMAT})
        keeps_float = self.config.weights == "fp32" and self.config.lm_head == "fp32" and "float_weights" in artifact.properties
        pack = {"format": PACK_FORMAT, "block": BLOCK, "weights": self.config.weights, "lm_head": self.config.lm_head}
        # The engine's Linears replace the input's quantized modules and the precision table that described them.
        return write_output(artifact, self, ctx, records={"cpu_pack": pack}, modules={}, properties={"float_weights"} if keeps_float else (), drop=("precision",))
