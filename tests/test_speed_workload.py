"""A speed workload longer than the model's context is bad input, refused before any pass runs (exit 2)."""

import yaml
from typer.testing import CliRunner

from optforge.cli import app


def test_a_workload_beyond_the_context_exits_2_before_any_work(tiny_model_dir, tmp_path, cache_dir):
    recipe = {
        "model": {"source": str(tiny_model_dir)},
        "data": {"eval": {"perplexity": None}, "speed": {"input_len": 500, "output_len": 64, "repeats": 2}},
        "passes": [{"name": "quant.int8_weight_only", "gate": {"metric": "decode_tok_s", "min_speedup": 1.1}}],
        "output": str(tmp_path / "out"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["build", str(path), "--cache-dir", str(cache_dir)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "564 per request, beyond the model's context of 512 tokens" in text
    assert not (cache_dir / "passes").exists()  # refused before the pass ran
