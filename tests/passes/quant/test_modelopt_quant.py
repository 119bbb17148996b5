"""quant.modelopt on the tiny Llama: ModelOpt's calibration written as optforge modules.

Without modelopt (CI): recipes validate, a build stops with exit 2 naming the install, and configs optforge cannot
write are refused with the supported list. With nvidia-modelopt 0.47.0 (CPU, fake quant): the artifact's Linears are
optforge modules whose weights equal ModelOpt's fake-quantized ones, its logits follow ModelOpt's model, it loads,
serves in the runtime and meets perplexity gates. Measured on this model (max |logits| 1.64, 66-token prompt):
- FP8_DEFAULT_CFG: artifact vs ModelOpt's fake-quant model 2.2e-3 (each Linear alone: 4e-7 relative; float32
  rounding upstream flips a few E4M3 roundings of static activations), tolerance 1e-2. Quantization itself moves
  the logits 2.9e-2.
- INT4_AWQ_CFG: artifact vs ModelOpt's model with its AWQ scales folded as the pass folds them 2.9e-3 (the CPU
  int4pack_mm kernel; with dense dequantized weights 2.4e-7), tolerance 1e-2; the folding's re-smoothing (one scale
  for q/k/v and for gate/up, o_proj averaged over GQA groups) moves it 8.3e-2 from the raw fake-quant model here
  (random weights).
"""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

import optforge
from optforge.errors import GateFailed, MissingDependencyError, RecipeError

PROMPT = "Paris is the capital of France, and the quick brown fox jumps over the lazy dog. def add(a, b): return a + b"
LOGITS_TOL = 1e-2  # absolute, on logits of max |1.64|


def recipe(make_recipe, tiny_model_dir, out: Path, name: str, gate: dict | None = None) -> dict:
    return make_recipe(tiny_model_dir, out, gate_pct=None, passes=[{"name": "quant.modelopt", "config": {"config": name}, "gate": gate}])


# ---------------------------------------------------------------- without modelopt (always, CI included)


@pytest.fixture
def no_modelopt(monkeypatch):
    """The machine lacks nvidia-modelopt: `import modelopt` raises ImportError."""
    monkeypatch.setitem(sys.modules, "modelopt", None)


def test_recipe_validates_and_build_names_the_install_without_modelopt(no_modelopt, tiny_model_dir, tmp_path, make_recipe):
    import yaml

    from optforge.recipe import load_recipe

    spec = recipe(make_recipe, tiny_model_dir, tmp_path / "out", "INT4_AWQ_CFG", gate={"metric": "perplexity", "max_increase_pct": 5})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    parsed, _ = load_recipe(path)  # the pass configs are checked too (pass_.plan_passes), modelopt not needed
    assert parsed.passes[0].config == {"config": "INT4_AWQ_CFG"}
    with pytest.raises(MissingDependencyError, match=r"pip install 'optforge\[modelopt\]'") as exc:
        optforge.build(path, cache_dir=tmp_path / "cache")
    assert exc.value.exit_code == 2 and "quant.modelopt" in str(exc.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,why", [
    ("NVFP4_DEFAULT_CFG", "no FP4 module"),
    ("INT8_SMOOTHQUANT_CFG", "quantizes each token's activations at run time"),
    ("INT8_DEFAULT_CFG", "static per-tensor scale"),
    ("W4A8_AWQ_BETA_CFG", "no W4A8 module"),
    ("MXFP8_DEFAULT_CFG", "microscaling"),
    ("FP8_KV_CFG", "quant.kv_cache"),
    ("FP8_DEFAUT_CFG", "Did you mean 'FP8_DEFAULT_CFG'"),
])
def test_configs_optforge_cannot_write_are_refused_with_the_supported_list(no_modelopt, tiny_model_dir, tmp_path, make_recipe, name, why):
    with pytest.raises(RecipeError, match="Supported: FP8_DEFAULT_CFG, FP8_PER_CHANNEL_PER_TOKEN_CFG, INT4_AWQ_CFG") as exc:
        optforge.build(recipe(make_recipe, tiny_model_dir, tmp_path / "out", name), cache_dir=tmp_path / "cache")
    assert why in str(exc.value) and name in str(exc.value) and exc.value.exit_code == 2
    assert "passes[0].config" in str(exc.value)


def test_only_configs_that_read_activations_enter_the_calibration_key(no_modelopt):
    from optforge.passes.quant.modelopt_quant import ModelOptConfig, ModelOptQuant

    assert ModelOptQuant(ModelOptConfig(config="FP8_DEFAULT_CFG")).uses_calibration
    assert not ModelOptQuant(ModelOptConfig(config="INT8_WEIGHT_ONLY_CFG")).uses_calibration
    assert "quantized_activations" in ModelOptQuant(ModelOptConfig(config="FP8_PER_CHANNEL_PER_TOKEN_CFG")).produces
    assert "quantized_activations" not in ModelOptQuant(ModelOptConfig(config="INT4_AWQ_CFG")).produces


# ---------------------------------------------------------------- with modelopt


@pytest.fixture(scope="module")
def mtq():
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt not installed (pip install 'optforge[modelopt]')")
    from optforge.passes.quant.modelopt_quant import import_modelopt

    return import_modelopt()[1]


@pytest.fixture
def builds(mtq, build_tiny):
    """builds(config, gate=None, out=None) -> BuildResult of the tiny Llama through quant.modelopt (one pass cache for the
    session: a config is calibrated once)."""

    def build(name: str, gate: dict | None = None, out: str | None = None):
        return build_tiny([{"name": "quant.modelopt", "config": {"config": name}, "gate": gate}], out or f"modelopt-{name}")

    return build


_REFERENCES: dict[str, tuple] = {}  # config -> (raw, folded): ModelOpt's calibration is the slow part (AWQ-lite ~7 s here)


def calibration_rows(tiny_model_dir, make_recipe) -> list[torch.Tensor]:
    """The token ids the pass calibrates on for the tiny recipe (its calibration rows, as `calibration_samples` cuts them)."""
    from transformers import AutoTokenizer

    from optforge.context import PassContext
    from optforge.passes.calibration import calibration_samples
    from optforge.recipe import CalibrationSpec, ModelSpec

    calibration = CalibrationSpec(**make_recipe(tiny_model_dir, Path("unused"))["data"]["calibration"])
    ctx = PassContext(output_dir=Path("unused"), model=ModelSpec(source=str(tiny_model_dir)), calibration=calibration)
    return calibration_samples("quant.modelopt", AutoTokenizer.from_pretrained(tiny_model_dir), ctx, None)


def modelopt_reference(mtq, tiny_model_dir, make_recipe, name: str):
    """(raw, folded) ModelOpt fake-quant models of the tiny Llama, calibrated on the rows the pass calibrates on
    (folded: AWQ's scales folded as the pass folds them; the same model for other configs). Shared: copy before changing."""
    from transformers import LlamaForCausalLM

    from optforge.passes.quant.modelopt_quant import calibrate, fold_pre_quant_scales

    if name not in _REFERENCES:
        raw = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
        calibrate(mtq, raw, name, calibration_rows(tiny_model_dir, make_recipe), ["lm_head"])
        folded = copy.deepcopy(raw)
        if name == "INT4_AWQ_CFG":
            fold_pre_quant_scales(folded, "quant.modelopt")
        _REFERENCES[name] = raw, folded
    return _REFERENCES[name]


def logits(model, tokenizer_dir) -> torch.Tensor:
    from transformers import AutoTokenizer

    ids = torch.tensor([AutoTokenizer.from_pretrained(tokenizer_dir).encode(PROMPT)])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name,module,label", [
    ("FP8_DEFAULT_CFG", "Fp8Linear", "fp8 e4m3 tensor (static activations, modelopt-max)"),
    ("INT4_AWQ_CFG", "WeightOnlyLinear", "int4 g64 sym (modelopt-awq_lite)"),
])
def test_artifact_is_optforge_modules_matching_modelopts_fake_quant(mtq, builds, tiny_model_dir, make_recipe, name, module, label):
    from optforge.model_io import load_model

    result = builds(name)
    layout = json.loads((result.output / "optforge.json").read_text())
    assert layout["precision"]["model.layers.0.self_attn.q_proj"] == label and layout["precision"]["lm_head"] == "float"
    report = layout["quantization"]
    assert report["config"] == name and report["modelopt_version"] == "0.47.0" and report["method"].startswith("modelopt-")
    assert report["samples"] == 4 and report["calibration_tokens"] > 4 * 8 and report["max_weight_error"] < 1e-6
    assert len(layout["modules"]) == 14 and {s["method"] for s in layout["modules"].values()} == {report["method"]}

    ours, _ = load_model(result.output)
    linears = {n: m for n, m in ours.named_modules() if n.endswith("_proj")}
    assert {type(m).__name__ for m in linears.values()} == {module}
    raw, folded = modelopt_reference(mtq, tiny_model_dir, make_recipe, name)
    for n, m in linears.items():  # each weight equals ModelOpt's fake-quantized one (float32 rounding)
        reference = folded.get_submodule(n)
        expected = reference.weight_quantizer(reference.weight.detach())
        got = m.dequantized() if module == "WeightOnlyLinear" else m.weight.float() * m.weight_scale
        assert torch.allclose(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max())), n
    got, expected = logits(ours, tiny_model_dir), logits(folded, tiny_model_dir)
    assert (got - expected).abs().max() <= LOGITS_TOL
    if name == "INT4_AWQ_CFG":  # the folded scales are ModelOpt's export's re-smoothing, listed in the report
        assert "model.layers.0.self_attn.o_proj" in report["resmoothed"]
        assert report["folded"]["model.layers.0.input_layernorm"] == [f"model.layers.0.self_attn.{p}_proj" for p in "kqv"]
        assert (logits(raw, tiny_model_dir) - expected).abs().max() > LOGITS_TOL  # what re-smoothing changes, measured


def test_folding_changes_no_float_function(mtq, tiny_model_dir, make_recipe):
    """With every quantizer off, ModelOpt's AWQ model with its scales folded (re-smoothing, GQA averaging, norms, up_proj's
    and v_proj's rows) computes what the float model computes."""
    from transformers import LlamaForCausalLM

    folded = copy.deepcopy(modelopt_reference(mtq, tiny_model_dir, make_recipe, "INT4_AWQ_CFG")[1])
    mtq.disable_quantizer(folded, "*")
    expected = logits(LlamaForCausalLM.from_pretrained(tiny_model_dir).eval(), tiny_model_dir)
    assert (logits(folded, tiny_model_dir) - expected).abs().max() <= 1e-5


def test_folding_with_float_linears_in_a_group_changes_no_float_function(mtq, tiny_model_dir, make_recipe):
    """Linears the recipe keeps float but that read a folded output (k_proj beside q/v) or produce one (a float up_proj
    ahead of down_proj, beside a quantized gate_proj) take the inverse scale, so the float function still holds."""
    from transformers import LlamaForCausalLM

    from optforge.passes.quant.modelopt_quant import calibrate, fold_pre_quant_scales, pre_quant_scale

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    float_linears = ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"]
    calibrate(mtq, model, "INT4_AWQ_CFG", calibration_rows(tiny_model_dir, make_recipe), ["lm_head", *float_linears])
    for name in float_linears:
        assert not model.get_submodule(name).weight_quantizer.is_enabled and pre_quant_scale(model.get_submodule(name)) is None
    folds = fold_pre_quant_scales(model, "quant.modelopt")
    assert set(float_linears) <= set(folds["changed_float"])
    mtq.disable_quantizer(model, "*")
    expected = logits(LlamaForCausalLM.from_pretrained(tiny_model_dir).eval(), tiny_model_dir)
    assert (logits(model, tiny_model_dir) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["FP8_DEFAULT_CFG", "INT4_AWQ_CFG"])
def test_artifact_serves_in_the_runtime_like_hf_generate(builds, name, hf_greedy):
    from optforge.model_io import load_model
    from optforge.runtime.llm import LLM, EngineConfig
    from optforge.runtime.sequence import SamplingParams

    out = builds(name).output
    model, tok = load_model(out)
    prompts = ["def add(a, b):", "The river"]
    expected, _ = hf_greedy(model, [tok.encode(p) for p in prompts], 8)
    llm = LLM(out, EngineConfig(num_blocks=64, block_size=4))
    layer = llm.engine.runner.decoder.layers[0].mlp.down_proj
    assert type(layer).__name__ == ("Fp8Linear" if name.startswith("FP8") else "WeightOnlyLinear")
    assert [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))] == expected
    assert layer.kernel is not None  # the quantized module ran inside the runtime's forward


def test_perplexity_gate_passes_and_fails_as_configured(builds):
    passed = builds("FP8_DEFAULT_CFG", gate={"metric": "perplexity", "max_increase_pct": 50}, out="gate-ok")
    assert passed.manifest["passes"][0]["gate"]["passed"] is True
    # The tiny model's perplexity (~300, random weights) moves by ~0.1%: a 0% gate cannot pass, and undecided fails.
    with pytest.raises(GateFailed) as exc:
        builds("INT4_AWQ_CFG", gate={"metric": "perplexity", "max_increase_pct": 0.0, "on_undecided": "fail"}, out="gate-bad")
    assert exc.value.pass_name == "quant.modelopt" and exc.value.exit_code == 3
    assert exc.value.result["passed"] is False and exc.value.result["measured"] > exc.value.result["threshold"]


def test_int4_codes_round_exact_ties_as_modelopt_does(mtq):
    """Weights on a coarse grid (SmolLM2's are Q4_1-born) give exact ties w * 7 / amax = k + 0.5: the codes must divide
    as ModelOpt divides (one ulp decides the tie), across ModelOpt's blocks of 128 with a padded last one (192 columns)."""
    from torch import nn

    from optforge.passes.quant.modelopt_quant import conversion_error, read_linear

    gen = torch.Generator().manual_seed(0)
    amax = torch.rand(64, 1, generator=gen) + 0.05
    w = amax * torch.tensor([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0])[torch.randint(0, 7, (64, 192), generator=gen)]
    w[:, 0], w[:, 128] = amax[:, 0], -amax[:, 0]  # each block's amax pinned
    model = nn.Sequential(nn.Linear(192, 64, bias=False))
    model[0].weight.data = w
    mtq.quantize(model, mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG, None)
    converted = read_linear("0", model[0], "modelopt-max", "quant.modelopt")
    assert converted.spec["group_size"] == 64 and converted.scale.shape == (64, 3)  # 192 = 128 + 64 (padded)
    assert conversion_error(model[0], converted)[0] < 1e-6  # 0.13 with a reciprocal-multiply scale


def test_excluded_linears_stay_float(mtq, build_tiny):
    config = {"config": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "exclude": [r"lm_head", r"down_proj"]}
    layout = json.loads((build_tiny([{"name": "quant.modelopt", "config": config}], "modelopt-exclude").output / "optforge.json").read_text())
    assert layout["precision"]["model.layers.0.mlp.down_proj"] == "float" and len(layout["modules"]) == 12
    assert layout["quantization"]["left_float"] == []  # ModelOpt's config quantized every target


def test_weight_only_configs_need_no_calibration_text(builds):
    """INT8_WEIGHT_ONLY_CFG and INT4_BLOCKWISE_WEIGHT_ONLY_CFG calibrate weights only (no forward loop)."""
    for name, label in [("INT8_WEIGHT_ONLY_CFG", "int8 channel sym (modelopt-max)"), ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "int4 g128 sym (modelopt-max)")]:
        layout = json.loads((builds(name).output / "optforge.json").read_text())
        assert layout["precision"]["model.layers.1.mlp.down_proj"] == label
        assert layout["quantization"]["samples"] == 0 and layout["quantization"]["max_weight_error"] < 1e-6


def test_block_size_sets_the_int4_block(mtq, build_tiny):
    """`block_size` replaces the INT4 configs' 128 (ModelOpt's export needs widths that are whole blocks)."""
    out = build_tiny([{"name": "quant.modelopt", "config": {"config": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "block_size": 16}}], "modelopt-block16").output
    precision = json.loads((out / "optforge.json").read_text())["precision"]
    assert precision["model.layers.0.mlp.down_proj"] == "int4 g16 sym (modelopt-max)"


def test_block_size_must_be_a_power_of_two(no_modelopt, tiny_model_dir, tmp_path, make_recipe):
    spec = recipe(make_recipe, tiny_model_dir, tmp_path / "out", "INT4_AWQ_CFG")
    spec["passes"][0]["config"]["block_size"] = 48
    with pytest.raises(RecipeError, match="block_size must be a power of two") as exc:
        optforge.build(spec, cache_dir=tmp_path / "cache")
    assert exc.value.exit_code == 2
