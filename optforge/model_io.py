"""Model I/O: load an optforge model directory into a torch module (quantized layers, fusions and the
quantized KV cache re-applied), and save a model as one safetensors file.

Dense directories go through `AutoModelForCausalLM.from_pretrained` (HF's own loader). Directories with
quantized modules are built from their config, the Linear layers listed in optforge.json are swapped for
the modules that run their stored format, and the safetensors state is loaded with `assign=True`.
A folder of NVIDIA ModelOpt's unified checkpoint (`hf_quant_config.json`, as `export.modelopt` writes) is read
into the same modules (formats/modelopt_checkpoint.py). Mixture-of-experts models get one Linear MLP per expert
either way (formats/experts.py), and their files use the Hub's per-expert tensor names.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from optforge.artifact import LAYOUT_FILE, WEIGHTS_FILE
from optforge.errors import ArtifactError
from optforge.formats import swap_linear
from optforge.formats.experts import disk_key, memory_key, unfuse_experts
from optforge.formats.fused import apply_fusions
from optforge.formats.modelopt_checkpoint import is_modelopt_checkpoint, kv_record, read_checkpoint
from optforge.formats.kv_cache import apply_kv_cache_layout
from optforge.tensor_files import mmap_safetensors, write_safetensors

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu", *, trust_remote_code: bool = False, fusions: bool = True, mmap: bool = False):
    """Return (model, tokenizer) for an optforge model directory, in eval mode.

    `fusions=False` leaves `fuse.linears`' module fusions unapplied: passes that rewrite weights change and
    save the standard Linears (and carry the fusion record on). `mmap=True` (a model that stays on the host, as
    calibrated passes keep it): weights stored in `dtype` are copy-on-write views of the safetensors files
    (tensor_files.py), so host memory holds only what the pass changes or computes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    torch_dtype = DTYPES[dtype]
    layout = json.loads((path / LAYOUT_FILE).read_text()) if (path / LAYOUT_FILE).is_file() else {}
    modules = layout.get("modules", {})
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    state = kv = None
    if not modules and is_modelopt_checkpoint(path):  # ModelOpt's unified checkpoint (export.modelopt)
        modules, state, kv = read_checkpoint(path)
    dense_mmap = not modules and mmap and device == "cpu" and bool(_weight_files(path))
    if not modules and not dense_mmap:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        unfuse_experts(model)
        return _apply_layout(model, layout, fusions).to(device).eval(), tokenizer

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with _no_init_weights():  # every weight comes from the file: random init would cost minutes at 8B on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    unfuse_experts(model, copy=False)
    for name, spec in modules.items():
        swap_linear(model, name, spec)
    state = {memory_key(config.model_type, k): v for k, v in (state if state is not None else _read_weights(path, mmap)).items()}
    for key, value in state.items():
        if value.is_floating_point() and not key.endswith("_scale") and not key.endswith("_zero"):
            state[key] = value.to(torch_dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        if dense_mmap:  # names HF's loader converts (an older checkpoint layout): let it read them
            log.info("%s: the file's tensor names need HF's conversions; loading without memory mapping", path)
            return load_model(path, dtype, device, trust_remote_code=trust_remote_code, fusions=fusions)
        raise ArtifactError(f"{path}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if kv:
        layout = {**layout, "kv_cache": kv_record(model, kv)}
    return _apply_layout(model, layout, fusions).to(device).eval(), tokenizer


def _weight_files(path: Path) -> list[Path]:
    """The directory's safetensors: optforge's single file, or a (sharded) Hugging Face checkpoint's files."""
    return [path / WEIGHTS_FILE] if (path / WEIGHTS_FILE).is_file() else sorted(path.glob("*.safetensors"))


def _read_weights(path: Path, mmap: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        state |= mmap_safetensors(file) if mmap else load_file(file)
    return state


def _no_init_weights():
    """transformers' context that skips weight initialization (buffers computed in __init__, such as rotary
    frequencies, are still computed); a no-op context where the installed transformers lacks it."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return no_init_weights()


def _apply_layout(model, layout: dict, fusions: bool = True):
    """Re-apply what optforge.json records beyond weights: module fusions (`fuse.linears`) and the quantized
    KV cache (`quant.kv_cache`), so evals and gates see the model as it will be served."""
    if layout.get("kv_cache"):
        apply_kv_cache_layout(model, layout["kv_cache"])
    if fusions and layout.get("fusions"):
        model = apply_fusions(model, layout["fusions"])
    return model


def save_model(model: torch.nn.Module, tokenizer, path: str | Path) -> None:
    """Write config, tokenizer and a single safetensors file (tied weights stored once), one tensor at a time."""
    path = Path(path)
    model.config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    state = {}
    seen: dict[int, str] = {}
    for key, tensor in model.state_dict().items():
        ptr = tensor.data_ptr()
        if ptr in seen and tensor.numel() > 0:
            continue  # a tied parameter (lm_head sharing embed_tokens): stored once
        seen[ptr] = key
        state[disk_key(model.config.model_type, key)] = tensor.detach().contiguous().cpu()
    write_safetensors(path / WEIGHTS_FILE, state, metadata={"format": "pt"})
