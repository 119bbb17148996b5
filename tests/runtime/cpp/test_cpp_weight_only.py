"""Weight-only artifacts run as weight-only in the C++ runtime: float32 activations, the integer weights widened
with the artifact's float32 scales. Their logits match the torch runtime's model to fp32 summation order, greedy
tokens through `--backend cpp` equal the torch backend's, and formats that quantize activations (pack.cpu
engines, w8a8_int8) keep the int8-activation path, chosen per Linear from optforge.json."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from optforge.hashing import file_table
from optforge.model_io import load_model
from optforge.runtime.llm import LLM
from optforge.runtime.sequence import SamplingParams

PROMPTS = [[5, 17, 42, 99, 7], [3, 3, 3], [120, 4, 56, 78, 90, 11, 23, 250, 8, 9, 10, 12, 13, 14, 15, 16, 17, 18]]
# Max |logit difference| from the torch runtime on the same artifact: what fp32 summation order leaves (the fp32
# folder itself shows ~1e-5 here); int8 activations miss it by ~1e-2.
LOGIT_TOL = 1e-4


@pytest.fixture
def build(tiny_model_dir, tmp_path_factory, make_recipe):
    """build(passes, name) -> the artifact directory of the tiny Llama through `passes` (one cache for the session)."""
    import optforge

    root = tmp_path_factory.getbasetemp() / "cpp_weight_only"

    def run(passes: list, name: str):
        return optforge.build(make_recipe(tiny_model_dir, root / name, gate_pct=None, passes=passes), cache_dir=root / "cache").output

    return run


def torch_logits(path, ids: list[int], *, dequantized: bool = False) -> np.ndarray:
    """The torch runtime's last logits; `dequantized`: with each weight-only Linear as the fp32 matmul of q * scale
    (the torch runtime's int4 CPU kernel rounds activations and scales to bf16, ~2e-3 off on these logits)."""
    model, _ = load_model(path, dtype="float32", device="cpu")
    for module in model.modules():
        if dequantized and hasattr(module, "dequantized"):
            module.forward = lambda x, m=module: torch.nn.functional.linear(x, m.dequantized(), m.bias)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


@pytest.mark.parametrize("passes,name,weights", [
    ([{"name": "quant.int8_weight_only"}], "int8", "int8"),
    ([{"name": "quant.rtn", "config": {"bits": 4, "group_size": 32}}], "int4-g32", "int4"),
    ([{"name": "quant.rtn", "config": {"bits": 8, "group_size": 64}}], "int8-g64", "int8"),
])
def test_weight_only_logits_match_the_torch_runtime(rt, build, passes, name, weights):
    path = build(passes, name)
    engine = rt.Engine(str(path), num_threads=2)
    assert (engine.weight_format, engine.activations) == (weights, "fp32")
    for ids in PROMPTS:
        diff = np.abs(engine.last_logits(ids) - torch_logits(path, ids, dequantized=weights == "int4")).max()
        assert diff < LOGIT_TOL, (name, ids, diff)


def test_weight_only_greedy_tokens_equal_the_torch_backend(rt, build):
    path = build([{"name": "quant.int8_weight_only"}], "int8")
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    want = [o.token_ids for o in LLM(path, enable_prefix_caching=False).generate(PROMPTS, params)]
    llm = LLM(path, backend="cpp", num_threads=2, num_blocks=12, block_size=4, max_num_batched_tokens=8)  # chunks, preemption
    assert llm.engine.runner.activations == "fp32"
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == want


def with_schemes(src, dst, scheme_of) -> str:
    """A copy of artifact `src` whose optforge.json records `scheme_of(name)` for each quantized module."""
    shutil.copytree(src, dst)
    layout = json.loads((dst / "optforge.json").read_text())
    for name, spec in layout["modules"].items():
        spec["scheme"] = scheme_of(name)
    (dst / "optforge.json").write_text(json.dumps(layout))
    (dst / "manifest.json").unlink()
    (dst / "manifest.json").write_text(json.dumps({"schema_version": 1, "files": file_table(dst)}))
    return str(dst)


def test_activations_follow_the_format_of_each_linear(rt, build, tmp_path):
    path = build([{"name": "quant.int8_weight_only"}], "int8")
    weight_only = rt.Engine(str(path), num_threads=1)
    w8a8 = rt.Engine(with_schemes(path, tmp_path / "w8a8", lambda name: "w8a8_int8"), num_threads=1)
    mixed = rt.Engine(with_schemes(path, tmp_path / "mixed", lambda name: "w8a8_int8" if "mlp" in name else "int8_weight_only"), num_threads=1)
    assert (weight_only.activations, w8a8.activations, mixed.activations) == ("fp32", "int8", "mixed")
    ref = torch_logits(path, PROMPTS[2])
    exact, quantized = (np.abs(e.last_logits(PROMPTS[2]) - ref).max() for e in (weight_only, w8a8))
    assert exact < LOGIT_TOL < quantized  # int8 activations are a different model, not the gated one


def test_pack_cpu_engines_keep_int8_activations(rt, build, tmp_path):
    from optforge.artifact import ModelArtifact
    from optforge.context import PassContext
    from optforge.passes.pack.cpu import CpuPack, CpuPackConfig
    from optforge.recipe import ModelSpec

    path = build([{"name": "quant.int8_weight_only"}], "int8")
    out = tmp_path / "engine"
    out.mkdir()
    ctx = PassContext(output_dir=out, model=ModelSpec(source=str(path)), calibration=None)
    CpuPack(CpuPackConfig(weights="int8", lm_head="fp32")).run(ModelArtifact.open(path), ctx)
    engine = rt.Engine(str(out), num_threads=1, verify=False)  # a pass output: no manifest yet
    assert (engine.weight_format, engine.activations) == ("int8", "int8")
    assert np.isfinite(engine.last_logits(PROMPTS[0])).all()
