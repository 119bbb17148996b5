"""export.modelopt on the tiny Llama: ModelOpt's tensor names, dtypes and shapes, hf_quant_config.json and config.json's
quantization_config per scheme, dequantized weights equal to the artifact's, refusals, cache hit.

The expectations are hard-coded from nvidia-modelopt 0.47.0's own `export_hf_checkpoint` run on this tiny model
(FP8_DEFAULT_CFG + FP8_KV_CFG, FP8_PER_CHANNEL_PER_TOKEN_CFG, INT4_AWQ_CFG with block size 32; fake-quant on the
CPU, float32). CI has no modelopt, so these carry the weight there; where modelopt imports, the last tests run its
export on the same model and compare structure (values of two calibrations differ) and its helpers directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from optforge import __version__
from optforge.errors import PassError
from optforge.formats.grid import dequantize
from optforge.formats.modelopt_checkpoint import unpack_int4_rows
from optforge.formats.packing import unpack_int4
from optforge.passes.export.modelopt import exclude_summary, layer_config, module_tensors, pack_int4_rows

LINEARS = {  # (out, in) of the tiny Llama's Linears: hidden 64, intermediate 128, 4 heads of 16, 2 KV heads
    "self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64), "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64), "mlp.down_proj": (64, 128),
}
FLOATS = {"model.embed_tokens.weight": [300, 64], "model.norm.weight": [64]} | {
    f"model.layers.{i}.{norm}.weight": [64] for i in range(2) for norm in ("input_layernorm", "post_attention_layernorm")}  # lm_head is tied: not stored
EXCLUDED = ["lm_head", "model.embed_tokens"]
FP8 = {"dynamic": False, "num_bits": 8, "type": "float"}
PRODUCER = {"name": "optforge", "version": __version__}


def expected_tensors(leaves) -> dict[str, list]:
    """{name: [dtype, shape]} of the whole checkpoint, with `leaves(linear, out, in)` giving each Linear's tensors."""
    table = {k: ["float32", v] for k, v in FLOATS.items()}
    for i in range(2):
        for linear, (out, inp) in LINEARS.items():
            table.update({f"model.layers.{i}.{linear}.{leaf}": spec for leaf, spec in leaves(linear, out, inp).items()})
    return table


def fp8_static(linear, out, inp):
    kv = {"k_scale": ["float32", []]} if linear == "self_attn.k_proj" else {"v_scale": ["float32", []]} if linear == "self_attn.v_proj" else {}
    return {"weight": ["float8_e4m3fn", [out, inp]], "weight_scale": ["float32", []], "input_scale": ["float32", []]} | kv


def fp8_channel(linear, out, inp):
    return {"weight": ["float8_e4m3fn", [out, inp]], "weight_scale": ["float32", [out]]}


def int4_g32(linear, out, inp):
    pqs = {"pre_quant_scale": ["float32", [inp]]} if linear in ("self_attn.o_proj", "mlp.down_proj") else {}  # fed by no shared norm
    return {"weight": ["uint8", [out // 2, inp]], "weight_scale": ["float32", [out, inp // 32]]} | pqs


SCHEMES = {  # optforge passes -> (hf_quant_config.json "quantization", config.json quantization_config, tensors)
    "fp8-tensor-static-kv": (
        [{"name": "quant.fp8", "config": {"strategy": "tensor", "dynamic": False}}, {"name": "quant.kv_cache"}],
        {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": EXCLUDED},
        {"config_groups": {"group_0": {"input_activations": FP8, "weights": FP8, "targets": ["Linear"]}}, "ignore": EXCLUDED, "quant_algo": "FP8",
         "kv_cache_scheme": FP8, "producer": PRODUCER, "quant_method": "modelopt"},
        expected_tensors(fp8_static),
    ),
    "fp8-channel": (
        [{"name": "quant.fp8"}],
        {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "kv_cache_quant_algo": None, "exclude_modules": EXCLUDED},
        {"ignore": EXCLUDED, "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "producer": PRODUCER, "quant_method": "modelopt"},
        expected_tensors(fp8_channel),
    ),
    "awq-int4-g32": (
        [{"name": "quant.awq", "config": {"group_size": 32}}],
        {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": 32, "has_zero_point": False, "pre_quant_scale": True, "exclude_modules": EXCLUDED},
        {"ignore": EXCLUDED, "quant_algo": "W4A16_AWQ", "producer": PRODUCER, "quant_method": "modelopt"},
        expected_tensors(int4_g32),
    ),
}


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict:
    """This module's build folder and the builds made so far, so each scheme is built once."""
    return {"root": tmp_path_factory.mktemp("modelopt"), "built": {}}


@pytest.fixture
def export(builds, tiny_model_dir, make_recipe, cached_pass_output):
    """export(passes, name) -> (exported artifact, its input artifact, build result): the tiny Llama through
    `passes` + export.modelopt (read from the pass cache, where the pass wrote its folder)."""
    import optforge

    root = builds["root"]

    def run(passes: list, name: str, export_config: dict | None = None):
        if name not in builds["built"]:
            recipe = make_recipe(tiny_model_dir, root / name, gate_pct=None, passes=[*passes, {"name": "export.modelopt", "config": export_config or {}}])
            result = optforge.build(recipe, cache_dir=root / "cache")
            n = len(result.manifest["passes"])
            builds["built"][name] = (cached_pass_output(root / "cache", result.manifest, n - 1), cached_pass_output(root / "cache", result.manifest, n - 2), result)
        return builds["built"][name]

    return run


def tensor_table(path: Path) -> dict[str, list]:
    return {k: [str(t.dtype).removeprefix("torch."), list(t.shape)] for k, t in read_tensors(path).items()}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_checkpoint_has_modelopts_names_dtypes_shapes_and_json(export, scheme):
    passes, quantization, quant_config, tensors = SCHEMES[scheme]
    exported, _, _ = export(passes, scheme)
    folder = exported.path / "modelopt"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "hf_quant_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    hf = json.loads((folder / "hf_quant_config.json").read_text())
    assert hf == {"producer": PRODUCER, "quantization": quantization}
    assert list(hf["quantization"]) == list(quantization)  # ModelOpt's key order too
    model_config = json.loads((folder / "config.json").read_text())
    assert model_config["quantization_config"] == quant_config and model_config["dtype"] == "float32"
    assert tensor_table(folder / "model.safetensors") == tensors
    record = exported.layout["modelopt"]
    assert record["quant_algo"] == quantization["quant_algo"] and record["num_quantized"] == 14
    assert "modelopt_checkpoint" in exported.properties and exported.quantized_modules  # still the optforge model beside it


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_dequantized_export_equals_the_artifact(export, scheme):
    exported, source, _ = export(SCHEMES[scheme][0], scheme)
    ours, theirs = read_tensors(source.path / "model.safetensors"), read_tensors(exported.path / "modelopt" / "model.safetensors")
    for name, spec in source.quantized_modules.items():
        if spec["scheme"] == "fp8":
            expected = ours[f"{name}.weight"].float() * ours[f"{name}.weight_scale"]
            scale = theirs[f"{name}.weight_scale"]
            got = theirs[f"{name}.weight"].float() * (scale if scale.dim() == 0 else scale[:, None])
        else:
            expected = dequantize(unpack_int4(ours[f"{name}.weight_packed"]), ours[f"{name}.weight_scale"], None)
            got = dequantize(unpack_int4_rows(theirs[f"{name}.weight"]), theirs[f"{name}.weight_scale"], None)
            pqs = theirs.get(f"{name}.pre_quant_scale")
            assert pqs is None or torch.equal(pqs, torch.ones_like(pqs))  # AWQ's scales are in the weights already
        assert torch.equal(got, expected), name
        if spec.get("dynamic") is False:
            assert torch.equal(theirs[f"{name}.input_scale"], ours[f"{name}.input_scale"].reshape(()))
    for name in FLOATS:
        assert torch.equal(theirs[name], ours[name])
    for idx, scale in source.layout.get("kv_cache", {}).get("scales", {}).items():
        assert theirs[f"model.layers.{idx}.self_attn.k_proj.k_scale"].item() == pytest.approx(scale["k"], rel=1e-7)
        assert theirs[f"model.layers.{idx}.self_attn.v_proj.v_scale"].item() == pytest.approx(scale["v"], rel=1e-7)


def test_mixed_precision_lists_each_layer(export):
    exported, _, _ = export([{"name": "quant.rtn", "config": {"group_size": 32, "int8_layers": ["down_proj"]}}], "rtn-mixed")
    folder = exported.path / "modelopt"
    int4 = {"quant_algo": "W4A16_AWQ", "group_size": 32, "has_zero_point": False, "pre_quant_scale": True}
    layers = {f"model.layers.{i}.{linear}": {"quant_algo": "W8A16"} if linear == "mlp.down_proj" else int4 for i in range(2) for linear in LINEARS}
    hf = json.loads((folder / "hf_quant_config.json").read_text())
    # ModelOpt 0.47 lists no exclude_modules in a MIXED_PRECISION config: a layer outside quantized_layers is unquantized.
    assert hf["quantization"] == {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "quantized_layers": layers}
    groups = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]
    assert groups["group_0"] == {"weights": {"dynamic": False, "num_bits": 4, "type": "int", "group_size": 32}, "targets": sorted(n for n in layers if "down_proj" not in n)}
    assert groups["group_1"] == {"weights": {"dynamic": False, "num_bits": 8, "type": "int"}, "targets": ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]}
    table = tensor_table(folder / "model.safetensors")
    assert table["model.layers.0.mlp.down_proj.weight"] == ["int8", [64, 128]] and table["model.layers.0.mlp.down_proj.weight_scale"] == ["float32", [64]]
    assert "model.layers.0.mlp.down_proj.pre_quant_scale" not in table  # W8A16 carries none (ModelOpt's INT8_WEIGHT_ONLY_CFG)


def test_dtype_casts_only_unquantized_tensors(export):
    exported, _, _ = export([{"name": "quant.awq", "config": {"group_size": 32}}], "awq-bf16", {"dtype": "bfloat16"})
    folder = exported.path / "modelopt"
    table = tensor_table(folder / "model.safetensors")
    assert table["model.embed_tokens.weight"][0] == table["model.layers.0.mlp.down_proj.pre_quant_scale"][0] == "bfloat16"
    assert table["model.layers.0.mlp.down_proj.weight_scale"][0] == "float32" and table["model.layers.0.mlp.down_proj.weight"][0] == "uint8"
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"


def test_rebuild_is_a_cache_hit(export, builds, tiny_model_dir, make_recipe):
    import optforge

    export(SCHEMES["fp8-channel"][0], "fp8-channel")
    recipe = make_recipe(tiny_model_dir, builds["root"] / "again", gate_pct=None, passes=[{"name": "quant.fp8"}, {"name": "export.modelopt"}])
    again = optforge.build(recipe, cache_dir=builds["root"] / "cache")
    assert again.manifest["passes"][-1]["cached"] is True


def test_build_output_holds_the_checkpoint_and_its_manifest_lists_it(export):
    from optforge.artifact import open_artifact

    _, _, result = export(SCHEMES["fp8-channel"][0], "fp8-channel")
    assert (result.output / "modelopt" / "hf_quant_config.json").is_file()
    listed = {row["path"] for row in json.loads((result.output / "manifest.json").read_text())["files"]}
    assert {"modelopt/hf_quant_config.json", "modelopt/model.safetensors"} <= listed
    open_artifact(result.output)  # verifies every file against the manifest


@pytest.mark.parametrize("spec, message", [
    ({"scheme": "w8a8_int8", "method": "smoothquant"}, "W8A8_SQ_PER_CHANNEL needs a static per-tensor input_scale"),
    ({"scheme": "fp8", "strategy": "channel", "dynamic": False}, "FP8 per channel only with dynamic per-token activations"),
    ({"scheme": "weight_only", "bits": 4, "group_size": 32, "symmetric": False}, "no zero point"),
    ({"scheme": "weight_only", "bits": 4, "group_size": None, "symmetric": True}, "needs a group size"),
    ({"scheme": "weight_only", "bits": 8, "group_size": 32, "symmetric": True}, "one scale per output channel"),
])
def test_inexpressible_formats_are_refused_naming_the_linear(spec, message):
    with pytest.raises(PassError, match=message) as err:
        layer_config("model.layers.0.mlp.up_proj", spec, torch.nn.Linear(64, 128))
    assert "model.layers.0.mlp.up_proj" in str(err.value)


def test_smoothquant_build_and_int8_kv_cache_are_refused(export):
    with pytest.raises(PassError, match="'model.layers.0.self_attn.q_proj'.*W8A8_SQ_PER_CHANNEL"):
        export([{"name": "quant.smoothquant", "config": {"alpha": 0.5}}], "sq")
    with pytest.raises(PassError, match="KV cache is int8.*FP8 KV-cache scales only"):
        export([{"name": "quant.fp8"}, {"name": "quant.kv_cache", "config": {"dtype": "int8"}}], "kv-int8")
    with pytest.raises(PassError, match="no quantized Linear"):
        export([], "float")


LOADABLE = {name: passes for name, (passes, *_) in SCHEMES.items()} | {"rtn-mixed": [{"name": "quant.rtn", "config": {"group_size": 32, "int8_layers": ["down_proj"]}}]}


@pytest.mark.parametrize("scheme", list(LOADABLE))
def test_optforge_serves_the_checkpoint_as_the_artifact_it_came_from(export, scheme):
    """load_model reads the ModelOpt folder into the same modules (and FP8 KV scales) as the artifact: the same
    logits bit for bit, and the runtime's greedy tokens."""
    from optforge.model_io import load_model
    from optforge.runtime.llm import EngineConfig, LLM
    from optforge.runtime.sequence import SamplingParams

    exported, _, _ = export(LOADABLE[scheme], scheme)
    artifact, tokenizer = load_model(exported.path)
    checkpoint, _ = load_model(exported.path / "modelopt")
    quantized = [{n for n, m in model.named_modules() if "Linear" in type(m).__name__ and type(m) is not torch.nn.Linear} for model in (artifact, checkpoint)]
    assert quantized[0] == quantized[1] and quantized[0]  # INT8 per channel reads back as Int8WeightOnlyLinear, the same numbers
    ids = torch.tensor([[1 + (7 * j * j) % 290 for j in range(24)]])
    with torch.no_grad():
        assert torch.equal(artifact(ids).logits, checkpoint(ids).logits)
    prompts = [[1 + (11 * i + 7 * j * j) % 290 for j in range(12 + 3 * i)] for i in range(3)]
    tokens = [[o.token_ids for o in LLM.from_model(m, tokenizer, EngineConfig(num_blocks=64, block_size=4)).generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))]
              for m in (artifact, checkpoint)]
    assert tokens[0] == tokens[1]


def test_checkpoints_optforge_cannot_serve_are_refused(export, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from optforge.errors import ArtifactError
    from optforge.model_io import load_model

    exported, _, _ = export(SCHEMES["awq-int4-g32"][0], "awq-int4-g32")
    folder = shutil.copytree(exported.path / "modelopt", tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.pre_quant_scale"] = torch.full_like(tensors["model.layers.1.mlp.down_proj.pre_quant_scale"], 2.0)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ArtifactError, match="'model.layers.1.mlp.down_proj' carries an AWQ pre_quant_scale"):
        load_model(folder)
    config = json.loads((folder / "hf_quant_config.json").read_text())
    config["quantization"]["quant_algo"] = "NVFP4"
    (folder / "hf_quant_config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="quant_algo 'NVFP4' has no optforge module; readable: FP8, FP8_PER_CHANNEL_PER_TOKEN, W4A16_AWQ, W8A16"):
        load_model(folder)


def test_per_tensor_dynamic_fp8_repeats_its_scale_per_row():
    weight = torch.randn(4, 8).to(torch.float8_e4m3fn)
    out = module_tensors("l", {"weight": weight, "weight_scale": torch.tensor([0.5])}, "FP8_PER_CHANNEL_PER_TOKEN", torch.float32)
    assert torch.equal(out["l.weight_scale"], torch.full((4,), 0.5)) and out["l.weight"] is weight


def test_int4_rows_pack_two_per_byte_low_nibble_first():
    q = torch.tensor([[-8, 7, 0], [1, -1, 3]], dtype=torch.int8)  # rows 0 and 1 share each byte
    assert pack_int4_rows(q).tolist() == [[0x18, 0xF7, 0x30]]


def test_exclusions_are_summarized_as_modelopt_does():
    quantized = [f"model.layers.{i}.{linear}" for i in range(2) for linear in LINEARS if not (i == 1 and linear.startswith("self_attn")) and (i, linear) != (0, "mlp.down_proj")]
    unquantized = ["model.embed_tokens", "model.layers.0.mlp.down_proj", *[f"model.layers.1.{lin}" for lin in LINEARS if lin.startswith("self_attn")], "lm_head"]
    # ModelOpt 0.47.0's exclude_modules for FP8_PER_CHANNEL_PER_TOKEN_CFG with these quantizers disabled on the tiny Llama.
    assert exclude_summary(unquantized, quantized) == ["lm_head", "model.embed_tokens", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn*"]


# ---------------------------------------------------------------- against modelopt itself, where it is installed


@pytest.fixture(scope="module")
def modelopt_exports(tiny_model_dir, tmp_path_factory):
    """ModelOpt's own export of the tiny Llama (float32) for each scheme: {scheme: folder}."""
    import copy

    mtq = pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    int4 = copy.deepcopy(mtq.INT4_AWQ_CFG)
    for entry in int4["quant_cfg"]:
        if isinstance(entry.get("cfg"), dict) and entry["cfg"].get("num_bits") == 4:
            entry["cfg"]["block_sizes"][-1] = 32  # the tiny Llama's 64 inputs hold no block of 128
    fp8_kv = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    fp8_kv["quant_cfg"] = [*fp8_kv["quant_cfg"], *mtq.FP8_KV_CFG["quant_cfg"]]
    configs = {"fp8-tensor-static-kv": fp8_kv, "fp8-channel": mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG, "awq-int4-g32": int4}
    root, folders = tmp_path_factory.mktemp("modelopt-reference"), {}
    samples = [torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for scheme, cfg in configs.items():
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        mtq.quantize(model, cfg, lambda m: [m(x) for x in samples])
        export_hf_checkpoint(model, export_dir=root / scheme)
        folders[scheme] = root / scheme
    return folders


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_structure_matches_modelopts_own_export(export, modelopt_exports, scheme):
    exported, _, _ = export(SCHEMES[scheme][0], scheme)
    ours, theirs = exported.path / "modelopt", modelopt_exports[scheme]
    assert tensor_table(ours / "model.safetensors") == tensor_table(theirs / "model.safetensors")
    hf_ours, hf_theirs = (json.loads((d / "hf_quant_config.json").read_text()) for d in (ours, theirs))
    assert hf_ours["quantization"] == hf_theirs["quantization"] and list(hf_ours["quantization"]) == list(hf_theirs["quantization"])
    qc_ours, qc_theirs = (json.loads((d / "config.json").read_text())["quantization_config"] for d in (ours, theirs))
    assert {**qc_ours, "producer": None} == {**qc_theirs, "producer": None} and list(qc_ours) == list(qc_theirs)


def test_helpers_agree_with_modelopts(export, modelopt_exports):
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format
    from modelopt.torch.export.quant_utils import _prefix_wildcard_summarize_exclude_modules, pack_int4_in_uint8

    exported, _, _ = export(SCHEMES["awq-int4-g32"][0], "awq-int4-g32")
    mixed, _, _ = export([{"name": "quant.rtn", "config": {"group_size": 32, "int8_layers": ["down_proj"]}}], "rtn-mixed")
    for folder in (exported.path / "modelopt", mixed.path / "modelopt"):
        hf = json.loads((folder / "hf_quant_config.json").read_text())
        assert json.loads((folder / "config.json").read_text())["quantization_config"] == convert_hf_quant_config_format(hf)
    q = torch.randint(-8, 8, (6, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    scale = torch.rand(6, 2) + 0.1
    assert torch.equal(pack_int4_rows(q), pack_int4_in_uint8(dequantize(q, scale, None), scale, 32))
    names = ["lm_head", "model.embed_tokens", "model.layers.1.mlp.up_proj", "model.layers.10.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    for cut in range(1, len(names)):
        unquantized, quantized = names[:cut], names[cut:]
        assert exclude_summary(unquantized, quantized) == sorted(_prefix_wildcard_summarize_exclude_modules(unquantized, quantized))
