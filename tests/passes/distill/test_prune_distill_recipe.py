"""prune -> distill -> quantize as one gated build: the shipped recipe validates, and the same chain builds
end to end on the tiny Llama (teacher 'source' resolved through the build's cache)."""

import json
from pathlib import Path

import optforge
from optforge.recipe import load_recipe

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "smollm2-prune-distill-quant.yaml"


def test_shipped_recipe_validates():
    recipe, _ = load_recipe(RECIPE)
    assert [p.name for p in recipe.passes] == ["prune.mlp_width", "distill.kd", "quant.int8_weight_only"]
    assert all(p.gate is not None for p in recipe.passes)


def test_prune_distill_quantize_builds_on_the_tiny_model(tiny_model_dir, tmp_path, make_recipe):
    passes = [
        {"name": "prune.mlp_width", "config": {"ratio": 0.5, "multiple_of": 8, "num_samples": 4, "seq_len": 32}, "gate": {"metric": "perplexity", "max_increase_pct": 100.0}},
        {"name": "distill.kd", "config": {"steps": 4, "batch_size": 2, "seq_len": 32, "max_windows": 4, "lr": 1e-3, "checkpoint_every": 2}, "gate": {"metric": "perplexity", "max_increase_pct": 100.0, "baseline": "source"}},
        {"name": "quant.int8_weight_only", "gate": {"metric": "perplexity", "max_increase_pct": 5.0}},
    ]
    recipe = make_recipe(tiny_model_dir, tmp_path / "out", passes=passes)
    result = optforge.build(recipe, cache_dir=tmp_path / "cache")
    records = result.manifest["passes"]
    assert [r["name"] for r in records] == ["prune.mlp_width", "distill.kd", "quant.int8_weight_only"]
    config = json.loads((result.output / "config.json").read_text())
    assert config["intermediate_size"] == 64
    layout = json.loads((result.output / "optforge.json").read_text())
    assert {"quantized_weights", "distilled", "structurally_pruned"} <= set(layout["properties"])
    distilled = json.loads((tmp_path / "cache" / "passes" / records[1]["cache_key"] / "optforge.json").read_text())
    assert distilled["distillation"]["steps"] == 4 and distilled["structured_pruning"]["intermediate_size"] == [128, 64]
    assert any((tmp_path / "cache" / "teacher-logits").glob("*.safetensors"))  # teacher 'source' found the build cache
    again = optforge.build(recipe, cache_dir=tmp_path / "cache")
    assert all(r["cached"] for r in again.manifest["passes"])
