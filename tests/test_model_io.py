"""Model I/O: save writes one safetensors file (tied weights once); load swaps in the quantized modules and
re-applies what optforge.json records beyond weights (KV-cache layout, module fusions)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import optforge
from optforge.artifact import LAYOUT_FILE, WEIGHTS_FILE, open_artifact
from optforge.errors import ArtifactError
from optforge.formats.fused import FusedSlice
from optforge.formats.int8 import Int8WeightOnlyLinear
from optforge.formats.kv_cache import KV_ATTENTION
from optforge.model_io import load_model, save_model


@pytest.fixture(scope="module")
def int8_artifact(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("model_io")
    recipe = {"name": "tiny-int8", "model": {"source": str(tiny_model_dir)}, "data": {"eval": {"perplexity": None}},
              "passes": [{"name": "quant.int8_weight_only"}], "output": str(root / "art")}
    return optforge.build(recipe, cache_dir=root / "cache").output


def _logits(model, ids=torch.arange(1, 20).unsqueeze(0)):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_loaded_artifact_runs(int8_artifact):
    model, tokenizer = load_model(open_artifact(int8_artifact).path)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Int8WeightOnlyLinear) and layer.weight.dtype == torch.int8
    ids = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all() and not model.training


def test_a_quantized_artifact_loads_without_initializing_weights(int8_artifact, monkeypatch):
    """Every weight comes from the file, so none is drawn at random first (at 8B that costs minutes on a CPU);
    buffers computed in __init__ (rotary frequencies) are still right: the logits match the built model's."""
    reference, _ = load_model(open_artifact(int8_artifact).path)
    draws = []
    original = torch.nn.init.normal_
    monkeypatch.setattr(torch.nn.init, "normal_", lambda *a, **k: draws.append(1) or original(*a, **k))
    model, _ = load_model(open_artifact(int8_artifact).path)
    assert draws == []
    assert torch.equal(_logits(model), _logits(reference))


def test_save_then_load_is_exact_and_stores_tied_weights_once(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(tiny_model_dir)
    save_model(model, tokenizer, tmp_path / "copy")
    stored = load_file(tmp_path / "copy" / WEIGHTS_FILE)
    assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored  # tied: once
    again, _ = load_model(tmp_path / "copy")
    assert torch.equal(_logits(again), _logits(model))


def _resaved(artifact, dst):
    """Load `artifact`, save it to `dst` with save_model and copy its layout; returns the loaded model."""
    model, tokenizer = load_model(artifact)
    save_model(model, tokenizer, dst)
    (dst / LAYOUT_FILE).write_text((artifact / LAYOUT_FILE).read_text())
    return model


def test_quantized_save_load_round_trip_is_exact(int8_artifact, tmp_path):
    model = _resaved(int8_artifact, tmp_path / "copy")
    again, _ = load_model(tmp_path / "copy")
    assert isinstance(again.model.layers[1].mlp.down_proj, Int8WeightOnlyLinear)
    assert torch.equal(_logits(again), _logits(model))


def test_weights_that_do_not_match_the_layout_are_an_artifact_error(int8_artifact, tmp_path):
    from safetensors.torch import save_file

    _resaved(int8_artifact, tmp_path / "copy")
    state = load_file(tmp_path / "copy" / WEIGHTS_FILE)
    del state["model.layers.0.mlp.gate_proj.weight_scale"]
    save_file(state, tmp_path / "copy" / WEIGHTS_FILE)
    with pytest.raises(ArtifactError, match="missing.*gate_proj.weight_scale"):
        load_model(tmp_path / "copy")


def test_layout_re_applies_the_kv_cache_and_fusions(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(tiny_model_dir)
    save_model(model, tokenizer, tmp_path / "m")
    scales = {str(i): {"k": 0.05, "v": 0.05} for i in range(2)}
    layout = {"kv_cache": {"dtype": "int8", "scales": scales}, "fusions": [{"kind": "sibling_linears", "groups": [["q_proj", "k_proj", "v_proj"]]}]}
    (tmp_path / "m" / LAYOUT_FILE).write_text(json.dumps(layout))
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config._attn_implementation == KV_ATTENTION
    assert isinstance(loaded.model.layers[0].self_attn.k_proj, FusedSlice)
    ref, got = _logits(model), _logits(loaded)
    assert not torch.equal(got, ref) and (got - ref).abs().max() < 0.1 * ref.abs().max()  # K/V rounded to int8
    (tmp_path / "m" / LAYOUT_FILE).write_text(json.dumps({"fusions": [{"kind": "mystery"}]}))
    with pytest.raises(ArtifactError, match="unknown module fusion"):
        load_model(tmp_path / "m")
