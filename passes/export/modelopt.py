"""NVIDIA Model Optimizer's unified Hugging Face checkpoint from a quantized artifact (`export.modelopt`).

The folder `<output>/modelopt/` holds what ModelOpt 0.47's `export_hf_checkpoint` writes, and what TensorRT-LLM's
PyTorch backend loads: config.json with a `quantization_config` (quant_method "modelopt"), hf_quant_config.json,
and one safetensors file with ModelOpt's tensor names, dtypes and shapes. optforge writes it from the artifact's own
tensors (modelopt is not imported), bit-exact: dequantizing the export gives the artifact's weights. The optforge
model files stay beside it, so evals and gates still read the artifact.

Per Linear, optforge scheme -> ModelOpt `quant_algo`: tensors (`out`, `in` the Linear's features):
- fp8 per tensor, static activations -> FP8: weight float8_e4m3fn (out, in); weight_scale, input_scale float32 ().
- fp8 per channel, dynamic activations -> FP8_PER_CHANNEL_PER_TOKEN: weight fp8 (out, in), weight_scale float32
  (out,). fp8 per tensor with dynamic activations is written so too, its one scale repeated per row (exact).
- int4 symmetric, group-wise (quant.awq, quant.gptq, quant.rtn) -> W4A16_AWQ, ModelOpt's only group-wise INT4
  algorithm: weight uint8 (out / 2, in), rows 2i and 2i + 1 in the low and high nibble of a byte (two's
  complement); weight_scale float32 (out, in / group). AWQ's scales are already folded into optforge's weights,
  so the `pre_quant_scale` ModelOpt keeps on a Linear whose input is not a norm output shared with other Linears
  (Llama's o_proj, down_proj) is written as ones, in the export dtype.
- int8 per channel, weight-only -> W8A16: weight int8 (out, in), weight_scale float32 (out,).
An FP8 KV cache (`quant.kv_cache`) adds `<attention>.k_proj.k_scale` and `<attention>.v_proj.v_scale`, float32 (),
max |K| / 448 as in ModelOpt. Unquantized Linears and embeddings are listed in `exclude_modules` with ModelOpt's
prefix wildcards; Linears of several algorithms make a MIXED_PRECISION config with per-layer `quantized_layers`.
Refused with a PassError naming the Linear: int4 asymmetric, per channel or with odd `out`; int8 group-wise or
asymmetric; fp8 per channel with static activations; W8A8 int8 (ModelOpt's W8A8_SQ_PER_CHANNEL needs a static
per-tensor input scale, optforge's W8A8 quantizes activations per token at run time); an int8 KV cache; Linears
that read one input (TensorRT-LLM fuses them) in different formats. Limits: one safetensors file, no shards; no
TensorRT-LLM has loaded these checkpoints on the machines of this project.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from optforge import __version__
from optforge.artifact import LAYOUT_FILE, WEIGHTS_FILE, ModelArtifact, copy_model_files
from optforge.context import PassContext
from optforge.errors import PassError
from optforge.pass_ import Pass, config, option, register
from optforge.passes.quant.output import describe

log = logging.getLogger(__name__)

EXPORT_DIR = "modelopt"
MODELOPT_VERSION = "0.47.0"  # the ModelOpt release whose export these tensors and JSON fields follow
NAME = "export.modelopt"
# Module types ModelOpt gives quantizers to in an LLM: the ones it lists in exclude_modules when left unquantized.
QUANTIZABLE = (nn.Linear, nn.Embedding, nn.LayerNorm)
# Files of the served folder besides weights and config: what TensorRT-LLM reads to tokenize and generate.
SERVING_FILES = ("generation_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")


@config
class ModelOptExportConfig:
    dtype: Literal["float32", "bfloat16", "float16"] | None = option(
        None, "dtype of the unquantized tensors (embeddings, norms, biases, lm_head, pre_quant_scale); null is the recipe's model.dtype. Scales stay float32")


def layer_config(name: str, spec: dict, module: nn.Module) -> dict:
    """ModelOpt's per-layer config (`quant_algo` and its fields) for a quantized Linear, or a PassError."""
    scheme, what = spec["scheme"], f"module '{name}' ({describe(spec)})"
    if scheme == "fp8":
        if spec.get("strategy") == "channel" and not spec.get("dynamic", True):
            raise PassError(NAME, f"{what}: ModelOpt has FP8 per channel only with dynamic per-token activations; use quant.fp8 with dynamic: true, or strategy: tensor")
        return {"quant_algo": "FP8"} if not spec.get("dynamic", True) else {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"}
    if scheme in ("weight_only", "int8_weight_only"):
        bits, group, symmetric = spec.get("bits", 8), spec.get("group_size"), spec.get("symmetric", True)
        if not symmetric:
            raise PassError(NAME, f"{what}: ModelOpt's weight-only formats have no zero point; quantize with symmetric: true")
        if bits == 8 and group is None:
            return {"quant_algo": "W8A16"}
        if bits == 4 and group is not None and module.out_features % 2 == 0:
            return {"quant_algo": "W4A16_AWQ", "group_size": group, "has_zero_point": False, "pre_quant_scale": True}
        need = "a group size (W4A16_AWQ) and an even number of output features" if bits == 4 else "one scale per output channel (W8A16)"
        raise PassError(NAME, f"{what}: ModelOpt's int{bits} weight-only format needs {need}")
    if scheme == "w8a8_int8":
        raise PassError(NAME, f"{what}: ModelOpt's W8A8_SQ_PER_CHANNEL needs a static per-tensor input_scale, and optforge's W8A8 quantizes activations per token at run time; export quant.fp8 or a weight-only model instead")
    raise PassError(NAME, f"{what}: scheme '{scheme}' has no ModelOpt form")


def _prefix_wildcards(name: str):
    """Summaries of `name` ModelOpt tries, shortest first: at each dot `prefix*`, then (`prefix`, `prefix.*`); last
    the name itself."""
    for i, ch in enumerate(name):
        if ch == ".":
            yield [name[:i] + "*"]
            yield [name[:i], name[:i] + ".*"]
    yield [name]


def exclude_summary(unquantized: list[str], quantized: list[str]) -> list[str]:
    """Unquantized module names as ModelOpt lists them: the first prefix wildcard (`model.layers.1.self_attn*`) that
    matches no quantized module (modelopt.torch.export.quant_utils._prefix_wildcard_summarize_exclude_modules)."""
    blocked = set(quantized) | {name[:i] + "*" for name in quantized for i in range(len(name) + 1)}
    summary: set[str] = set()
    for name in unquantized:
        for wildcards in _prefix_wildcards(name):
            if any(w in blocked for w in wildcards):
                continue
            if not all(w in summary for w in wildcards):  # else an earlier name's wildcard covers it already
                summary.add(wildcards[-1])  # the pair (p, p.*) is written as p.* alone
            break
    return sorted(summary)


def hf_quant_config(layers: dict[str, dict | None], kv_algo: str | None) -> dict:
    """hf_quant_config.json: one algorithm with its fields and `exclude_modules`, or MIXED_PRECISION with the
    per-layer configs (modelopt's get_quant_config and process_layer_quant_config, keys in their order)."""
    quantized = {n: c for n, c in layers.items() if c is not None}
    distinct = {json.dumps(c, sort_keys=True) for c in quantized.values()}
    quantization: dict = {"quant_algo": None, "kv_cache_quant_algo": None}
    if len(distinct) > 1:
        quantization.update(quant_algo="MIXED_PRECISION", quantized_layers=quantized)
    elif distinct:
        quantization.update(next(iter(quantized.values())))  # quant_algo keeps its place, its fields follow
        quantization["exclude_modules"] = exclude_summary([n for n, c in layers.items() if c is None], list(quantized))
    else:
        quantization["quantized_layers"] = {}  # only the KV cache is quantized: ModelOpt keeps the empty table
    if kv_algo is not None:
        quantization["kv_cache_quant_algo"] = kv_algo
    return {"producer": {"name": "optforge", "version": __version__}, "quantization": quantization}


def _group(layer: dict) -> dict:
    """The compressed-tensors-style group ModelOpt writes for one algorithm (convert_hf_config._quant_algo_to_group_config)."""
    fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
    return {
        "FP8": {"input_activations": fp8, "weights": fp8},
        "FP8_PER_CHANNEL_PER_TOKEN": {"input_activations": fp8, "weights": {**fp8, "strategy": "channel"}},
        "W4A16_AWQ": {"weights": {"dynamic": False, "num_bits": 4, "type": "int", "group_size": layer.get("group_size") or 128}},
        "W8A16": {"weights": {"dynamic": False, "num_bits": 8, "type": "int"}},
    }[layer["quant_algo"]]


def quantization_config(hf: dict) -> dict:
    """config.json's `quantization_config` from hf_quant_config.json (modelopt's convert_hf_quant_config_format)."""
    q, out = hf["quantization"], {}
    if q["quant_algo"] == "FP8":
        out["config_groups"] = {"group_0": {**_group(q), "targets": ["Linear"]}}
    elif q["quant_algo"] == "MIXED_PRECISION":
        targets: dict[str, list[str]] = {}
        for name, layer in q["quantized_layers"].items():
            targets.setdefault(json.dumps(sorted(layer.items())), []).append(name)
        out["config_groups"] = {f"group_{i}": {**_group(dict(json.loads(key))), "targets": sorted(names)} for i, (key, names) in enumerate(targets.items())}
        out["quantized_layers"] = q["quantized_layers"]
    out["ignore"] = q.get("exclude_modules") or []
    if q["quant_algo"]:
        out["quant_algo"] = q["quant_algo"]
    if q["kv_cache_quant_algo"]:
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    return out | {"producer": hf["producer"], "quant_method": "modelopt"}


def shared_inputs(model: nn.Module, quantized: set[str]) -> list[tuple[list[str], bool]]:
    """Groups of quantized Linears that read one tensor, each with whether a norm produced it: ModelOpt's dummy
    forward (unified_export_hf.collect_shared_input_modules), which decides what it fuses and what keeps a
    pre_quant_scale. TensorRT-LLM fuses such groups (q/k/v, gate/up) into one GEMM."""
    readers: dict[int, list[str]] = {}
    alive: dict[int, torch.Tensor] = {}  # every tensor seen stays referenced, so no id is reused mid-forward
    from_norm: set[int] = set()

    def on_norm(module, args, out):
        alive[id(out)] = out
        from_norm.add(id(out))

    def on_linear(name):
        def hook(module, args, out):
            if args:
                alive[id(args[0])] = args[0]
                readers.setdefault(id(args[0]), []).append(name)

        return hook

    handles = []
    for name, module in model.named_modules():
        if name in quantized:
            handles.append(module.register_forward_hook(on_linear(name)))
        elif "LayerNorm" in type(module).__name__ or "RMSNorm" in type(module).__name__:
            handles.append(module.register_forward_hook(on_norm))
    try:
        with torch.no_grad():
            model(torch.ones(1, 2, dtype=torch.long, device=next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    return [(names, key in from_norm) for key, names in readers.items()]


def pre_quant_scale_owners(layers: dict[str, dict | None], groups: list[tuple[list[str], bool]]) -> list[str]:
    """W4A16 Linears that keep a pre_quant_scale (ModelOpt folds it into a norm shared by several Linears only);
    a PassError where Linears that read one input differ in format."""
    folded = set()
    for names, by_norm in groups:
        formats = {json.dumps(layers[n], sort_keys=True) for n in names}
        if len(formats) > 1:
            raise PassError(NAME, f"{', '.join(names)} read the same input, which TensorRT-LLM multiplies in one fused GEMM, but are quantized differently ({'; '.join(sorted(formats))}); quantize them alike")
        if len(names) > 1 and by_norm:
            folded.update(names)
    return [n for n, c in layers.items() if c is not None and c["quant_algo"] == "W4A16_AWQ" and n not in folded]


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] (out, in) -> uint8 (out / 2, in): row 2i in the low nibble, row 2i + 1 in the high one
    (modelopt.torch.export.quant_utils.pack_int4_in_uint8)."""
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return (nibbles[0::2] | (nibbles[1::2] << 4)).contiguous()


def module_tensors(name: str, stored: dict[str, torch.Tensor], algo: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One quantized Linear's optforge tensors ({leaf: tensor}) in ModelOpt's names, dtypes and shapes."""
    from optforge.formats.packing import unpack_int4

    out: dict[str, torch.Tensor] = {}
    if "bias" in stored:
        out["bias"] = stored.pop("bias").to(dtype)
    if algo == "FP8":
        out.update(weight=stored.pop("weight"), weight_scale=stored.pop("weight_scale").float().reshape(()), input_scale=stored.pop("input_scale").float().reshape(()))
    elif algo == "FP8_PER_CHANNEL_PER_TOKEN":
        weight = stored.pop("weight")
        out.update(weight=weight, weight_scale=stored.pop("weight_scale").float().reshape(-1).expand(weight.shape[0]).contiguous())
    elif algo == "W4A16_AWQ":
        stored.pop("weight_shape")
        out.update(weight=pack_int4_rows(unpack_int4(stored.pop("weight_packed"))), weight_scale=stored.pop("weight_scale").float())
    elif algo == "W8A16":
        out.update(weight=stored.pop("weight"), weight_scale=stored.pop("weight_scale").float().reshape(-1))
    if stored:
        raise PassError(NAME, f"module '{name}' holds tensors {sorted(stored)} that {algo} has no place for")
    return {f"{name}.{leaf}": t for leaf, t in out.items()}


def checkpoint_tensors(weights: Path, layers: dict[str, dict | None], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the artifact's safetensors in ModelOpt's layout; unquantized floats cast to `dtype`."""
    from safetensors import safe_open

    out, by_module = {}, {}
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            owner, _, leaf = key.rpartition(".")
            tensor = f.get_tensor(key)
            if layers.get(owner) is not None:
                by_module.setdefault(owner, {})[leaf] = tensor
            else:
                out[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    for name, stored in by_module.items():
        out.update(module_tensors(name, stored, layers[name]["quant_algo"], dtype))
    return out


def kv_scales(model: nn.Module, kv: dict) -> dict[str, torch.Tensor]:
    """`<attention>.k_proj.k_scale` / `.v_proj.v_scale` float32 scalars from optforge.json's `kv_cache` record."""
    from optforge.formats.kv_cache import attention_layers

    if kv["dtype"] != "fp8":
        raise PassError(NAME, f"the artifact's KV cache is {kv['dtype']}; ModelOpt's checkpoint carries FP8 KV-cache scales only (quant.kv_cache with dtype: fp8)")
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for idx, module in sorted(attention_layers(model).items()):
        scale = kv["scales"].get(str(idx))
        if scale is None:
            raise PassError(NAME, f"the kv_cache record has no scales for attention layer {idx} ({names[id(module)]}); rebuild it with quant.kv_cache")
        out[f"{names[id(module)]}.k_proj.k_scale"] = torch.tensor(scale["k"], dtype=torch.float32)
        out[f"{names[id(module)]}.v_proj.v_scale"] = torch.tensor(scale["v"], dtype=torch.float32)
    return out


@register
class ModelOptExport(Pass):
    """Write NVIDIA ModelOpt's unified HF checkpoint, which TensorRT-LLM's PyTorch backend loads, into <output>/modelopt/."""

    name = NAME
    version = 1
    Config = ModelOptExportConfig
    requires = frozenset({"hf_causal_lm"})
    produces = frozenset({"hf_causal_lm", "modelopt_checkpoint"})

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from safetensors.torch import save_file

        from optforge.model_io import DTYPES
        from optforge.passes.output import load_input, write_output

        modules, kv = artifact.quantized_modules, artifact.layout.get("kv_cache")
        if artifact.layout.get("cpu_pack"):
            raise PassError(self.name, "its input holds the C++ runtime's packed weights (pack.cpu); put export.modelopt before pack.cpu")
        if not modules and not kv:
            raise PassError(self.name, "its input has no quantized Linear and no quantized KV cache: a plain Hugging Face checkpoint already serves it")
        dtype = self.config.dtype or ctx.dtype
        model, _ = load_input(artifact, ctx)  # standard (unfused) Linears: the names and structure ModelOpt sees
        named = dict(model.named_modules())
        absent = sorted(set(modules) - set(named))
        if absent:
            raise PassError(self.name, f"optforge.json lists quantized modules the model does not have (e.g. '{absent[0]}'); rebuild the artifact")
        layers = {n: layer_config(n, modules[n], m) if n in modules else None for n, m in named.items() if n in modules or isinstance(m, QUANTIZABLE)}
        pqs = pre_quant_scale_owners(layers, shared_inputs(model, set(modules)))
        extra = kv_scales(model, kv) if kv else {}
        extra.update({f"{n}.pre_quant_scale": torch.ones(named[n].in_features, dtype=DTYPES[dtype]) for n in pqs})
        del model
        hf = hf_quant_config(layers, "FP8" if kv else None)
        tensors = checkpoint_tensors(artifact.path / WEIGHTS_FILE, layers, DTYPES[dtype]) | extra

        copy_model_files(artifact.path, ctx.output_dir)
        folder = ctx.output_dir / EXPORT_DIR
        folder.mkdir()
        save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
        self._write_configs(artifact.path, folder, hf, dtype)
        algos = sorted({c["quant_algo"] for c in layers.values() if c is not None})
        record = {
            "dir": EXPORT_DIR, "modelopt_version": MODELOPT_VERSION, "quant_algo": hf["quantization"]["quant_algo"], "algorithms": algos,
            "kv_cache_quant_algo": hf["quantization"]["kv_cache_quant_algo"], "dtype": dtype, "num_quantized": len(modules), "num_pre_quant_scale_ones": len(pqs),
        }
        log.info("export.modelopt: %s (%d quantized Linears) in %s", record["quant_algo"], len(modules), folder)
        return write_output(artifact, self, ctx, records={"modelopt": record})

    @staticmethod
    def _write_configs(source: Path, folder: Path, hf: dict, dtype: str) -> None:
        """hf_quant_config.json, config.json (its quantization_config replaced, its dtype the export's) and the
        tokenizer and generation files, as ModelOpt's export and hf_ptq.py leave them (indent 4)."""
        (folder / "hf_quant_config.json").write_text(json.dumps(hf, indent=4))
        model_config = json.loads((source / "config.json").read_text())
        model_config.pop("quantization_config", None)
        model_config["dtype"] = dtype
        if "torch_dtype" in model_config:
            model_config["torch_dtype"] = dtype
        model_config["quantization_config"] = quantization_config(hf)
        (folder / "config.json").write_text(json.dumps(model_config, indent=4))
        for item in sorted(source.iterdir()):
            if item.is_file() and item.name != LAYOUT_FILE and (item.name.startswith("tokenizer") or item.name in SERVING_FILES):
                shutil.copy2(item, folder / item.name)
