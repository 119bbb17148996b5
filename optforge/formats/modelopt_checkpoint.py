"""Reading NVIDIA ModelOpt's unified Hugging Face checkpoint (a folder with `hf_quant_config.json`) into optforge's
quantized modules, so `load_model` serves, evaluates and gates what `export.modelopt` (or ModelOpt's own
`export_hf_checkpoint`) wrote.

Each quantized Linear is recognised by its tensors (`<name>.weight_scale` beside the weight):
- FP8 (E4M3 `weight`): a scalar `weight_scale` with `input_scale` -> `Fp8Linear` per tensor, static activations;
  a per-row `weight_scale` -> per channel, dynamic per-token activations (FP8_PER_CHANNEL_PER_TOKEN).
- W4A16_AWQ (uint8 `weight` (out / 2, in), two rows per byte, low nibble first; `weight_scale` (out, in / g)) ->
  `WeightOnlyLinear` int4 symmetric, group g. A `pre_quant_scale` other than ones (ModelOpt's own AWQ export keeps
  o_proj's and down_proj's for TensorRT-LLM to apply) has no place in optforge's module: refused, naming it.
- W8A16 (int8 `weight`, `weight_scale` (out,)) -> `Int8WeightOnlyLinear`.
FP8 KV-cache scales (`k_proj.k_scale`, `v_proj.v_scale`) become the `kv_cache` record the loader applies. Other
`quant_algo`s (NVFP4, MXFP8, W4A8, INT8 SmoothQuant) are refused with the list of readable ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from optforge.errors import ArtifactError

CONFIG_FILE = "hf_quant_config.json"
READABLE = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "W4A16_AWQ", "W8A16", "MIXED_PRECISION")


def is_modelopt_checkpoint(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (out / 2, in) -> int8 (out, in) in [-8, 7]: the low nibble is row 2i, the high one row 2i + 1."""
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    rows = torch.stack((low, high), dim=1).reshape(-1, packed.shape[1])
    return torch.where(rows > 7, rows - 16, rows)


def read_checkpoint(path: Path) -> tuple[dict[str, dict], dict[str, torch.Tensor], dict | None]:
    """(modules {name: optforge spec}, state dict in optforge's layout, kv_cache record or None) of a ModelOpt folder."""
    from safetensors.torch import load_file

    from optforge.formats.packing import pack_int4

    path = Path(path)
    quant = json.loads((path / CONFIG_FILE).read_text()).get("quantization", {})
    algo = quant.get("quant_algo")
    if algo not in READABLE:
        raise ArtifactError(f"{path}: ModelOpt quant_algo {algo!r} has no optforge module; readable: {', '.join(READABLE[:-1])} (and mixtures of them)")
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state |= load_file(file)
    modules: dict[str, dict] = {}
    kv: dict[str, dict[str, float]] = {}
    for key in [k for k in state if k.endswith(".weight_scale")]:
        name = key.removesuffix(".weight_scale")
        weight, scale = state[f"{name}.weight"], state.pop(key)
        pre = state.pop(f"{name}.pre_quant_scale", None)
        if pre is not None and not torch.all(pre == 1):
            raise ArtifactError(f"{path}: '{name}' carries an AWQ pre_quant_scale (x * s before the Linear) that optforge's modules cannot apply; "
                                "export from optforge's quant.modelopt / quant.awq (which fold it) to serve it here")
        if weight.dtype == torch.float8_e4m3fn and scale.numel() == 1:
            modules[name] = {"scheme": "fp8", "strategy": "tensor", "dynamic": False}
            state[f"{name}.weight_scale"] = scale.float().reshape(1)
            state[f"{name}.input_scale"] = state.pop(f"{name}.input_scale").float().reshape(1)
        elif weight.dtype == torch.float8_e4m3fn:
            modules[name] = {"scheme": "fp8", "strategy": "channel", "dynamic": True}
            state[f"{name}.weight_scale"] = scale.float().reshape(-1, 1)
        elif weight.dtype == torch.uint8:
            q = unpack_int4_rows(state.pop(f"{name}.weight"))
            modules[name] = {"scheme": "weight_only", "method": "modelopt", "bits": 4, "group_size": q.shape[1] // scale.shape[1], "symmetric": True, "full_range": False}
            state[f"{name}.weight_packed"] = pack_int4(q)
            state[f"{name}.weight_shape"] = torch.tensor(list(q.shape), dtype=torch.int64)
            state[f"{name}.weight_scale"] = scale.float()
        elif weight.dtype == torch.int8:
            modules[name] = {"scheme": "int8_weight_only"}
            state[f"{name}.weight_scale"] = scale.float().reshape(-1, 1)
        else:
            raise ArtifactError(f"{path}: '{name}' has a {weight.dtype} weight with a weight_scale: not a format optforge reads")
    for key in [k for k in state if k.endswith((".k_scale", ".v_scale"))]:
        attention = key.rsplit(".", 2)[0]
        kv.setdefault(attention, {})[key[-7]] = float(state.pop(key))
    record = None
    if kv:
        if quant.get("kv_cache_quant_algo") != "FP8":
            raise ArtifactError(f"{path}: KV-cache scales of kv_cache_quant_algo {quant.get('kv_cache_quant_algo')!r}; optforge reads FP8 ones")
        record = {"dtype": "fp8", "attention": kv}
    return modules, state, record


def kv_record(model: torch.nn.Module, record: dict) -> dict:
    """The checkpoint's KV scales by attention module name -> optforge.json's `kv_cache` record (by layer index)."""
    from optforge.formats.kv_cache import attention_layers

    names = {id(m): n for n, m in model.named_modules()}
    scales = {str(i): record["attention"][names[id(m)]] for i, m in attention_layers(model).items() if names[id(m)] in record["attention"]}
    return {"dtype": record["dtype"], "scales": scales}
