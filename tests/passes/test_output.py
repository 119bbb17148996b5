"""A pass's input and output: every earlier pass's optforge.json records survive later passes, a weight
rewrite after `fuse.linears` saves the standard Linears (and the loader fuses them again), and passes load
their input in the recipe's dtype."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

import optforge
from optforge.formats.fused import FusedSlice
from optforge.model_io import load_model


def test_prune_fuse_quantize_keeps_every_record(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    passes = [{"name": "prune.magnitude"}, {"name": "fuse.linears"}, {"name": "quant.int8_weight_only"}]
    result = optforge.build(make_recipe(tiny_model_dir, tmp_path / "out", gate_pct=None, passes=passes), cache_dir=cache_dir)
    layout = json.loads((result.output / "optforge.json").read_text())
    assert layout["sparsity"]["method"] == "prune.magnitude"
    assert [f["kind"] for f in layout["fusions"]] == ["sibling_linears"]
    assert layout["quantization"]["method"] == "rtn" and layout["architecture"] == "LlamaForCausalLM"
    assert {"sparse_weights", "fused_linears", "quantized_weights"} <= set(layout["properties"])
    assert [p["name"] for p in result.manifest["passes"]] == [p["name"] for p in passes]
    listed = {row["path"] for row in result.manifest["files"]}
    assert "optforge.json" in listed
    with safe_open(result.output / "model.safetensors", "pt") as f:  # the standard names, never the fused ones
        assert "model.layers.0.self_attn.q_proj.weight" in f.keys() and not any(".group." in k for k in f.keys())
    assert set(layout["modules"]) == {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    model, _ = load_model(result.output)  # the loader fuses the quantized siblings again
    assert isinstance(model.model.layers[0].self_attn.q_proj, FusedSlice)
    assert torch.isfinite(model(input_ids=torch.arange(1, 20).unsqueeze(0)).logits).all()


def test_a_later_pass_keeps_records_it_does_not_write(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    passes = [{"name": "prune.wanda", "config": {"num_samples": 4, "seq_len": 16}}, {"name": "quant.kv_cache", "config": {"dtype": "int8"}}, {"name": "quant.rtn", "config": {"bits": 8, "group_size": None}}]
    result = optforge.build(make_recipe(tiny_model_dir, tmp_path / "out", gate_pct=None, passes=passes), cache_dir=cache_dir)
    layout = json.loads((result.output / "optforge.json").read_text())
    assert layout["sparsity"]["method"] == "prune.wanda" and layout["kv_cache"]["dtype"] == "int8"
    assert layout["quantization"]["method"] == "rtn" and len(layout["modules"]) == 14


def test_passes_compute_in_the_recipe_dtype(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    recipe = make_recipe(tiny_model_dir, tmp_path / "out", gate_pct=None, passes=[{"name": "quant.gptq", "config": {"bits": 4, "group_size": 32}}])
    recipe["model"]["dtype"] = "bfloat16"
    result = optforge.build(recipe, cache_dir=cache_dir)
    with safe_open(result.output / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16  # loaded and saved in bf16
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_packed").dtype == torch.int32  # int4 stays int4
