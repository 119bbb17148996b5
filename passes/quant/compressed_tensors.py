"""The compressed-tensors `quantization_config` for an artifact's quantized Linears.

Our modules store exactly the tensors of the compressed-tensors "pack-quantized" (int4 weight-only),
"int-quantized" (int8 weight-only and W8A8 int8) and "float-quantized" (FP8 W8A8) formats, so writing this block into config.json makes the artifact a checkpoint that
`transformers` (with the `compressed-tensors` package) and vLLM load. Layers with the same grid share one
config group whose targets are exact-name regexes; every Linear left in full precision is in `ignore`.
Known consumer limits (ENVIRONMENT.md): asymmetric packed int4 does not load on transformers 5.23.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

FORMAT_VERSION = "0.20.0"


def _format(spec: dict) -> str:
    if spec["scheme"] == "fp8":
        return "float-quantized"
    return "pack-quantized" if spec.get("bits") == 4 else "int-quantized"


def _args(bits: int, kind: str, strategy: str, *, dynamic: bool = False, group: int | None = None, symmetric: bool = True, actorder: str | None = None) -> dict:
    return {
        "num_bits": bits,
        "type": kind,
        "symmetric": symmetric,
        "strategy": strategy,
        "group_size": group,
        "dynamic": dynamic,
        "actorder": actorder,
        "observer": None if dynamic else "minmax",
    }


def _scheme_args(spec: dict) -> tuple[dict, dict | None]:
    """(weights, input_activations) QuantizationArgs dicts for one module spec."""
    scheme = spec["scheme"]
    if scheme == "w8a8_int8":
        return _args(8, "int", "channel"), _args(8, "int", "token", dynamic=True)
    if scheme == "fp8":
        dynamic = spec.get("dynamic", True)
        return _args(8, "float", spec.get("strategy", "channel")), _args(8, "float", "token" if dynamic else "tensor", dynamic=dynamic)
    if scheme not in ("weight_only", "int8_weight_only"):
        raise ValueError(f"scheme '{scheme}' has no compressed-tensors form here")
    spec = {"bits": 8, "group_size": None, "symmetric": True, **spec}
    group = spec["group_size"]
    strategy = "channel" if group is None else "group"
    return _args(spec["bits"], "int", strategy, group=group, symmetric=spec["symmetric"], actorder="static" if spec.get("act_order") else None), None


def quantization_config(modules: dict[str, dict], ignore: list[str]) -> dict:
    """config.json `quantization_config` for quantized modules {name: spec}; unknown schemes raise ValueError.

    `kv_cache_scheme` stays null: KV scales live in optforge.json (passes/quant/kv_cache.py), not as
    k_scale/v_scale tensors, so a consumer reading this block must not expect them.
    """
    groups: dict[str, dict] = {}
    for name, spec in sorted(modules.items()):
        try:
            weights, inputs = _scheme_args(spec)
        except ValueError as exc:
            raise ValueError(f"module '{name}': {exc}") from None
        key = json.dumps([weights, inputs, _format(spec)], sort_keys=True)
        group = groups.setdefault(key, {"targets": [], "weights": weights, "input_activations": inputs, "output_activations": None, "format": _format(spec)})
        group["targets"].append(f"re:^{re.escape(name)}$")
    _target_expert_blocks(groups)
    formats = {g["format"] for g in groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "version": FORMAT_VERSION,
    }


# An exact-name target of one expert's Linear, `re:^model\.layers\.0\.mlp\.experts\.3\.gate_proj$`; group 1 is the
# target's start up to its block (`re:^model\.layers\.0\.mlp\.experts`).
EXPERT_LINEAR = re.compile(r"^(.*\\\.experts)\\\.\d+\\\.\w+\$$")


def _target_expert_blocks(groups: dict[str, dict]) -> None:
    """Add a sparse block's own name (`model.layers.3.mlp.experts`) to the group that holds all of its quantized
    expert Linears: vLLM loads a block's experts as one fused MoE layer and looks its scheme up by that name.
    transformers ignores it (its experts module is no Linear)."""
    owner: dict[str, set[str]] = {}  # block target -> the groups holding its experts
    for key, group in groups.items():
        for target in group["targets"]:
            match = EXPERT_LINEAR.match(target)
            if match:
                owner.setdefault(match.group(1), set()).add(key)
    for block, keys in sorted(owner.items()):
        if len(keys) == 1:
            groups[next(iter(keys))]["targets"].append(f"{block}$")


def write_quantization_config(path: Path, modules: dict[str, dict], ignore: list[str], *, model_type: str = "") -> None:
    """Add the block to `path`/config.json (the rest of the file is left as saved by transformers); module
    names as the checkpoint spells them (formats/experts.disk_key)."""
    from optforge.formats.experts import disk_key

    config_path = Path(path) / "config.json"
    data = json.loads(config_path.read_text())
    data["quantization_config"] = quantization_config({disk_key(model_type, n): s for n, s in modules.items()}, [disk_key(model_type, n) for n in ignore])
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
