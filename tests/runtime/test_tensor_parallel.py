"""Tensor-parallel serving on the CPU (torchrun, gloo): the shards' partial products sum to the whole layer, and
`optforge generate --tensor-parallel 2` gives the tokens of one process, for a dense model, INT8 and INT4 artifacts;
a degree that does not divide the heads is exit 2 with the degrees that do."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from optforge.runtime.tensor_parallel import RowParallel, shard

PROMPTS = ["The quick brown fox", "Paris is the capital of", "def add(a, b):"]


def _generate(model, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "optforge", "generate", str(model), *PROMPTS, "--max-tokens", "16", "--json", "--cache-dir", str(tmp_path / "cache"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_shards_sum_to_the_whole_layer(tiny_model_dir):
    from transformers import LlamaForCausalLM

    whole = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    parts = [shard(copy.deepcopy(whole), rank, 2) for rank in (0, 1)]
    x = torch.randn(5, whole.config.hidden_size)
    layer = whole.model.layers[0]
    with torch.no_grad():
        mlp = sum(p.model.layers[0].mlp(x) for p in parts)  # RowParallel without a process group: each rank's partial sum
        torch.testing.assert_close(mlp, layer.mlp(x), rtol=1e-5, atol=1e-6)
        heads = [torch.cat([p.model.layers[0].self_attn.q_proj(x) for p in parts], -1), torch.cat([p.model.layers[0].self_attn.k_proj(x) for p in parts], -1)]
        torch.testing.assert_close(heads[0], layer.self_attn.q_proj(x))
        torch.testing.assert_close(heads[1], layer.self_attn.k_proj(x))
    assert isinstance(parts[0].model.layers[0].self_attn.o_proj, RowParallel) and parts[1].tensor_parallel == 2


QUANTIZED = {
    "int4 g16": {"name": "quant.rtn", "config": {"bits": 4, "group_size": 16}},
    "int4 g16 asymmetric": {"name": "quant.rtn", "config": {"bits": 4, "group_size": 16, "symmetric": False}},
    "int8 per channel": {"name": "quant.rtn", "config": {"bits": 8, "group_size": None}},
    "fp8 static": {"name": "quant.fp8", "config": {"strategy": "channel", "dynamic": False}},
    "w8a8": {"name": "quant.smoothquant"},
}


@pytest.fixture(scope="module")
def quantized_models(tiny_model_dir, tmp_path_factory):
    import optforge
    from optforge.model_io import load_model

    root = tmp_path_factory.mktemp("tp-formats")
    recipe = lambda name, step: {  # noqa: E731
        "name": "tp", "model": {"source": str(tiny_model_dir)},
        "data": {"calibration": {"dataset": "boolq", "rows": [2000, 2004], "max_length": 32}, "eval": {"perplexity": None}},
        "passes": [step], "output": str(root / name.replace(" ", "-")),
    }
    return {name: load_model(optforge.build(recipe(name, step), cache_dir=root / "cache").output)[0] for name, step in QUANTIZED.items()}


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_quantized_shards_sum_to_the_whole_layer(quantized_models, name):
    """Column-parallel shards of a quantized Linear are its output rows; row-parallel shards sum to its output
    (exactly where activations are not rounded per token; W8A8 rounds each rank's slice of the row itself)."""
    whole = quantized_models[name]
    parts = [shard(copy.deepcopy(whole), rank, 2) for rank in (0, 1)]
    x = torch.randn(5, whole.config.hidden_size)
    layer = whole.model.layers[0]
    with torch.no_grad():
        q = torch.cat([p.model.layers[0].self_attn.q_proj(x) for p in parts], -1)
        torch.testing.assert_close(q, layer.self_attn.q_proj(x), rtol=1e-5, atol=1e-6)
        mlp = sum(p.model.layers[0].mlp(x) for p in parts)
        tolerance = {"rtol": 0.05, "atol": 0.05 * float(layer.mlp(x).abs().max())} if name == "w8a8" else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(mlp, layer.mlp(x), **tolerance)
    assert type(parts[1].model.layers[0].mlp.down_proj.inner) is type(layer.mlp.down_proj)


def test_a_row_split_inside_a_group_is_refused(quantized_models):
    from optforge.errors import UserInputError
    from optforge.runtime.tensor_parallel import _slice

    down = quantized_models["int4 g16"].model.layers[0].mlp.down_proj
    with pytest.raises(UserInputError, match="inside a group of 16"):
        _slice(down, 1, slice(8, 72))


@pytest.mark.parametrize("step", [None, {"name": "quant.int8_weight_only"}, QUANTIZED["int4 g16"]], ids=["dense", "int8", "int4 g16"])
def test_two_processes_generate_the_tokens_of_one(tiny_model_dir, tmp_path, make_recipe, step):
    model = tiny_model_dir
    if step is not None:
        import optforge

        model = optforge.build(make_recipe(tiny_model_dir, tmp_path / "art", passes=[step]), cache_dir=tmp_path / "cache").output
    one, two = _generate(model, tmp_path), _generate(model, tmp_path, "--tensor-parallel", "2")
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert "steps run for rank 0" in two.stderr  # rank 1 ran the steps
    rows = [[json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")] for r in (one, two)]
    assert len(rows[0]) == len(PROMPTS) and rows[0] == rows[1]


def test_a_degree_that_does_not_divide_the_heads_is_exit_2(tiny_model_dir, tmp_path):
    result = _generate(tiny_model_dir, tmp_path, "--tensor-parallel", "3")  # 4 heads, 2 KV heads
    assert result.returncode == 2
    assert "--tensor-parallel 3 does not divide" in result.stderr and "degrees that do: 1, 2" in result.stderr


def test_bench_runs_tensor_parallel_without_the_hf_row(tiny_model_dir, tmp_path):
    cmd = [sys.executable, "-m", "optforge", "bench", str(tiny_model_dir), "--input-len", "8", "--output-len", "8", "--num-requests", "4",
           "--concurrency", "2", "--tensor-parallel", "2", "--cache-dir", str(tmp_path / "cache")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| optforge runtime |" in result.stderr + result.stdout and "not run beside a tensor-parallel engine" in result.stderr + result.stdout


def test_a_mixture_of_experts_model_is_refused_above_one_process():
    from transformers import Qwen3MoeConfig

    from optforge.errors import UserInputError
    from optforge.runtime.tensor_parallel import check_degree

    config = Qwen3MoeConfig(num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, num_experts=8)
    check_degree(config, 1)
    with pytest.raises(UserInputError, match="does not split mixture-of-experts"):
        check_degree(config, 2)
