"""pack.cpu: block formats round-trip, exact re-packing of int8 weight-only artifacts, and the packed
engine runs in the C++ runtime within stated tolerances of the fp32 model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from optforge.artifact import ModelArtifact
from optforge.context import PassContext
from optforge.passes.pack.cpu import CpuPack, CpuPackConfig, dequantize_packed, nibble_pack, nibble_unpack, pack_int8_blocks, quantize_int4_blocks
from optforge.recipe import ModelSpec


def run_pack(src, out, **cfg) -> ModelArtifact:
    out.mkdir()
    ctx = PassContext(output_dir=out, model=ModelSpec(source=str(src)), calibration=None)
    return CpuPack(CpuPackConfig(**cfg)).run(ModelArtifact.open(src), ctx)


@pytest.fixture(scope="module")
def tiny_src(tiny_model_dir):
    from optforge.artifact import write_layout

    if not (tiny_model_dir / "optforge.json").exists():
        write_layout(tiny_model_dir, properties={"hf_causal_lm", "float_weights"}, extra={"architecture": "LlamaForCausalLM"})
    return tiny_model_dir


def test_block_formats_round_trip():
    w = torch.randn(8, 64)
    q4, s4 = quantize_int4_blocks(w)
    assert torch.equal(nibble_unpack(nibble_pack(q4)), q4)
    err4 = (dequantize_packed(nibble_pack(q4), s4) - w).abs()
    assert bool((err4 <= s4.repeat_interleave(32, dim=1) / 2 + 1e-6).all())  # half a step at most
    q8, s8 = pack_int8_blocks(w)
    assert (dequantize_packed(q8, s8) - w).abs().max() <= s8.max() / 2 + 1e-6


def test_packed_layout_and_properties(tiny_src, tmp_path):
    out = run_pack(tiny_src, tmp_path / "int4", weights="int4", lm_head="int8")
    state = load_file(out.path / "model.safetensors")
    q = state["model.layers.0.mlp.up_proj.qweight"]
    assert q.dtype == torch.uint8 and tuple(q.shape) == (128, 32)
    assert state["lm_head.qweight"].dtype == torch.int8 and "model.embed_tokens.weight" in state
    assert "cpu_packed" in out.properties and "float_weights" not in out.properties
    assert out.layout["cpu_pack"]["weights"] == "int4"


def test_int8_weight_only_is_repacked_exactly(tiny_src, tmp_path):
    from optforge.passes.quant.int8_weight_only import Int8WeightOnly, Int8WeightOnlyConfig

    qdir = tmp_path / "q8"
    qdir.mkdir()
    ctx = PassContext(output_dir=qdir, model=ModelSpec(source=str(tiny_src)), calibration=None)
    quant = Int8WeightOnly(Int8WeightOnlyConfig()).run(ModelArtifact.open(tiny_src), ctx)
    packed = run_pack(quant.path, tmp_path / "packed", weights="int8", lm_head="fp32")
    before, after = load_file(quant.path / "model.safetensors"), load_file(packed.path / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj"
    assert torch.equal(after[f"{name}.qweight"], before[f"{name}.weight"])
    assert torch.equal(after[f"{name}.qscales"][:, 0], before[f"{name}.weight_scale"][:, 0])


@pytest.mark.parametrize("fmt,tol", [("fp32", 1e-4), ("int8", 0.05), ("int4", 0.35)])
def test_packed_engine_runs_close_to_fp32(tiny_src, tmp_path, fmt, tol):
    from transformers import AutoModelForCausalLM

    from optforge.runtime.cpp import is_available, load

    if not is_available():
        pytest.skip("C++ runtime extension not built (make cpp)")
    rt = load()
    out = run_pack(tiny_src, tmp_path / fmt, weights=fmt, lm_head=fmt)
    ids = [5, 17, 42, 99, 7, 3, 250]
    ours = rt.Engine(str(out.path), num_threads=2).last_logits(ids)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_src, dtype=torch.float32)(torch.tensor([ids])).logits[0, -1].numpy()
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < tol, rel
