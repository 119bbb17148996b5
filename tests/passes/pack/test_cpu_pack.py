"""pack.cpu: block formats round-trip with fp16 scales (format optforge-cpu/2), re-packing of int8 weight-only
artifacts keeps the integers, the packed engine runs in the C++ runtime within stated tolerances of the fp32
model, and the runtime still loads v1 engines (fp32 scales) and refuses newer formats."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from optforge.artifact import ModelArtifact
from optforge.context import PassContext
from optforge.passes.pack.cpu import PACK_FORMAT, CpuPack, CpuPackConfig, dequantize_packed, nibble_pack, nibble_unpack, pack_int8_blocks, quantize_int4_blocks
from optforge.recipe import ModelSpec


def run_pack(src, out, **cfg) -> ModelArtifact:
    out.mkdir()
    ctx = PassContext(output_dir=out, model=ModelSpec(source=str(src)), calibration=None)
    return CpuPack(CpuPackConfig(**cfg)).run(ModelArtifact.open(src), ctx)


@pytest.fixture(scope="module")
def tiny_src(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model with an optforge layout (the shared folder stays a plain HF folder)."""
    import shutil

    from optforge.artifact import write_layout

    src = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("pack") / "tiny-llama")
    write_layout(src, properties={"hf_causal_lm", "float_weights"}, extra={"architecture": "LlamaForCausalLM"})
    return src


def test_block_formats_round_trip():
    w = torch.randn(8, 64)
    q4, s4 = quantize_int4_blocks(w)
    assert s4.dtype == torch.float16 and torch.equal(nibble_unpack(nibble_pack(q4)), q4)
    err4 = (dequantize_packed(nibble_pack(q4), s4) - w).abs()
    assert bool((err4 <= s4.float().repeat_interleave(32, dim=1) / 2 + 1e-6).all())  # half a step at most
    q8, s8 = pack_int8_blocks(w)
    assert s8.dtype == torch.float16
    err8 = (dequantize_packed(q8, s8) - w).abs()
    assert bool((err8 <= s8.float().repeat_interleave(32, dim=1) / 2 + 1e-6).all())


def test_weights_are_fit_to_the_rounded_fp16_scale():
    w = torch.randn(16, 96) * torch.logspace(-6, 2, 16)[:, None]  # row 0 underflows fp16, then subnormals, then large
    w[0, :32] = 0  # an all-zero block: scale 1, not 0
    for quantize, qmax, qmin in ((pack_int8_blocks, 127, -127), (quantize_int4_blocks, 7, -8)):
        q, s = quantize(w)
        expected = (w.reshape(16, -1, 32).abs().amax(-1) / qmax).half()
        expected = torch.where(expected > 0, expected, torch.ones_like(expected))  # zero or underflowed: 1
        assert torch.equal(s, expected)
        fit = torch.clamp(torch.round(w.reshape(16, -1, 32) / s.float().unsqueeze(-1)), qmin, qmax)
        assert torch.equal(q.reshape(16, -1, 32).float(), fit)
    with pytest.raises(ValueError, match="overflows fp16"):
        pack_int8_blocks(torch.full((1, 32), 1e7))


def test_packed_layout_and_properties(tiny_src, tmp_path):
    out = run_pack(tiny_src, tmp_path / "int4", weights="int4", lm_head="int8")
    state = load_file(out.path / "model.safetensors")
    q = state["model.layers.0.mlp.up_proj.qweight"]
    assert q.dtype == torch.uint8 and tuple(q.shape) == (128, 32)
    assert state["lm_head.qweight"].dtype == torch.int8 and "model.embed_tokens.weight" in state
    assert "cpu_packed" in out.properties and "float_weights" not in out.properties
    assert out.layout["cpu_pack"]["weights"] == "int4"
    assert state["model.layers.0.mlp.up_proj.qscales"].dtype == torch.float16 and tuple(state["model.layers.0.mlp.up_proj.qscales"].shape) == (128, 2)
    assert PACK_FORMAT == "optforge-cpu/2" and out.layout["cpu_pack"]["format"] == PACK_FORMAT
    with safe_open(out.path / "model.safetensors", "pt") as f:
        assert f.metadata()["format"] == PACK_FORMAT


def test_int8_weight_only_is_repacked_exactly(tiny_src, tmp_path):
    from optforge.passes.quant.int8_weight_only import Int8WeightOnly, Int8WeightOnlyConfig

    qdir = tmp_path / "q8"
    qdir.mkdir()
    ctx = PassContext(output_dir=qdir, model=ModelSpec(source=str(tiny_src)), calibration=None)
    quant = Int8WeightOnly(Int8WeightOnlyConfig()).run(ModelArtifact.open(tiny_src), ctx)
    packed = run_pack(quant.path, tmp_path / "packed", weights="int8", lm_head="fp32")
    before, after = load_file(quant.path / "model.safetensors"), load_file(packed.path / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj"
    assert torch.equal(after[f"{name}.qweight"], before[f"{name}.weight"])  # the integers are kept
    assert torch.equal(after[f"{name}.qscales"][:, 0], before[f"{name}.weight_scale"][:, 0].half())  # scales rounded


@pytest.mark.parametrize("fmt,tol", [("fp32", 1e-4), ("int8", 0.05), ("int4", 0.35)])
def test_packed_engine_runs_close_to_fp32(tiny_src, tmp_path, fmt, tol):
    from transformers import AutoModelForCausalLM

    from optforge.runtime.cpp import is_available, load

    if not is_available():
        pytest.skip("C++ runtime extension not built (make cpp)")
    rt = load()
    out = run_pack(tiny_src, tmp_path / fmt, weights=fmt, lm_head=fmt)
    ids = [5, 17, 42, 99, 7, 3, 250]
    ours = rt.Engine(str(out.path), num_threads=2, verify=False).last_logits(ids)  # a pass output: no manifest yet
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_src, dtype=torch.float32)(torch.tensor([ids])).logits[0, -1].numpy()
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < tol, rel


def _rewrite_engine(src, dst, scales_dtype, fmt):
    """A copy of engine `src` with its qscales cast to `scales_dtype` and `fmt` as its format metadata."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    state = {k: v.to(scales_dtype) if k.endswith(".qscales") else v for k, v in state.items()}
    save_file(state, dst / "model.safetensors", metadata={"format": fmt})
    return dst


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_runtime_loads_v1_engines_and_refuses_newer(tiny_src, tmp_path, fmt):
    from optforge.runtime.cpp import is_available, load

    if not is_available():
        pytest.skip("C++ runtime extension not built (make cpp)")
    rt = load()
    v2 = run_pack(tiny_src, tmp_path / "v2", weights=fmt, lm_head=fmt).path
    ids = [5, 17, 42, 99, 7]
    want = rt.Engine(str(v2), num_threads=1, verify=False).last_logits(ids)  # pass outputs carry no manifest
    # v1 stored fp32 scales: these hold fp16 values, so rounding them back at load gives the same bits
    v1 = _rewrite_engine(v2, tmp_path / "v1", torch.float32, "optforge-cpu/1")
    assert np.array_equal(rt.Engine(str(v1), num_threads=1, verify=False).last_logits(ids), want)
    with pytest.raises(Exception, match="newer than this runtime.*pack.cpu"):
        rt.Engine(str(_rewrite_engine(v2, tmp_path / "v3", torch.float16, "optforge-cpu/3")), verify=False)
    with pytest.raises(Exception, match="qscales are F32, expected F16"):
        rt.Engine(str(_rewrite_engine(v2, tmp_path / "v2f32", torch.float32, "optforge-cpu/2")), verify=False)
