"""Structured pruning really shrinks the model, plain transformers loads it, and it computes what the
masked original computes (the removed channels/heads zeroed out)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from optforge.errors import PassError

CALIB = {"num_samples": 8, "seq_len": 32}
IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 12]])


def _load(artifact):
    return AutoModelForCausalLM.from_pretrained(artifact.path).eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _kept_columns(small: torch.Tensor, big: torch.Tensor) -> list[int]:
    """Which columns of `big` survive in `small` (columns are copied exactly and kept in order)."""
    kept, j = [], 0
    for i in range(big.shape[1]):
        if j < small.shape[1] and torch.equal(big[:, i], small[:, j]):
            kept.append(i)
            j += 1
    assert j == small.shape[1]
    return kept


def test_mlp_width_shrinks_and_matches_the_masked_original(tiny_artifact, run_pass):
    out = run_pass("prune.mlp_width", tiny_artifact, ratio=0.25, multiple_of=8, **CALIB)
    config = json.loads((out.path / "config.json").read_text())
    assert config["intermediate_size"] == 96  # 128 * 0.75
    small, big = _load(out), _load(tiny_artifact)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in big.parameters())
    assert out.weight_bytes() < tiny_artifact.weight_bytes()
    with torch.no_grad():
        for layer_small, layer_big in zip(small.model.layers, big.model.layers):
            kept = _kept_columns(layer_small.mlp.down_proj.weight, layer_big.mlp.down_proj.weight)
            dropped = [i for i in range(128) if i not in kept]
            layer_big.mlp.down_proj.weight[:, dropped] = 0.0
    torch.testing.assert_close(_logits(small), _logits(big), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("unit,heads,kv", [("query", 2, 2), ("kv_group", 2, 1)])
def test_heads_respect_gqa_and_match_the_masked_original(tiny_artifact, run_pass, unit, heads, kv):
    out = run_pass("prune.heads", tiny_artifact, ratio=0.5, unit=unit, **CALIB)
    config = json.loads((out.path / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (heads, kv, 16)
    small, big = _load(out), _load(tiny_artifact)
    with torch.no_grad():
        for layer_small, layer_big in zip(small.model.layers, big.model.layers):
            kept = _kept_columns(layer_small.self_attn.o_proj.weight, layer_big.self_attn.o_proj.weight)
            kept_heads = sorted({i // 16 for i in kept})
            assert len(kept_heads) == heads
            if unit == "query":  # one query head survives in each of the 2 KV groups (heads 0-1 | 2-3)
                assert [h // 2 for h in kept_heads] == [0, 1]
            dropped = [i for i in range(64) if i // 16 not in kept_heads]
            layer_big.self_attn.o_proj.weight[:, dropped] = 0.0
    torch.testing.assert_close(_logits(small), _logits(big), rtol=1e-4, atol=1e-4)


def test_depth_drops_the_least_important_block(tiny_artifact, run_pass):
    out = run_pass("prune.depth", tiny_artifact, num_layers=1, **CALIB)
    info = out.layout["structured_pruning"]
    bi = info["block_importance"]
    assert info["dropped_layers"] == [min(range(2), key=lambda i: bi[i])]
    assert json.loads((out.path / "config.json").read_text())["num_hidden_layers"] == 1
    kept = 1 - info["dropped_layers"][0]
    before, after = load_file(tiny_artifact.path / "model.safetensors"), load_file(out.path / "model.safetensors")
    for key, value in after.items():
        original = key.replace("layers.0.", f"layers.{kept}.") if key.startswith("model.layers.") else key
        assert torch.equal(value, before[original]), key
    assert _logits(_load(out)).shape == (1, 8, 300)


def test_structured_errors_name_the_problem(tiny_artifact, run_pass):
    with pytest.raises(PassError, match="num_layers"):
        run_pass("prune.depth", tiny_artifact, num_layers=2, **CALIB)
    with pytest.raises(PassError, match="at least one"):
        run_pass("prune.heads", tiny_artifact, ratio=0.1, **CALIB)
    with pytest.raises(PassError, match="unit"):
        run_pass("prune.heads", tiny_artifact, unit="kv", **CALIB)
    with pytest.raises(PassError, match="windows of 64 tokens"):
        run_pass("prune.mlp_width", tiny_artifact, num_samples=100000, seq_len=64)
