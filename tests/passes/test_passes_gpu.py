"""Calibrated passes run on the GPU when the build asks for it (`optforge build --device cuda`): the model,
the calibration samples and every statistic live on the device; the artifact loads on CPU."""

import gzip
import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PASSES = {
    "awq": {"name": "quant.awq", "config": {"bits": 4, "group_size": 32}},
    "gptq-act-order": {"name": "quant.gptq", "config": {"bits": 4, "group_size": 32, "act_order": True}},
    "smoothquant": {"name": "quant.smoothquant"},
    "fp8-static": {"name": "quant.fp8", "config": {"dynamic": False}},
    "kv-int8": {"name": "quant.kv_cache", "config": {"dtype": "int8"}},
    "sparsegpt-2:4": {"name": "prune.sparsegpt", "config": {"pattern": "2:4", "num_samples": 4, "seq_len": 16}},
    "mlp-width": {"name": "prune.mlp_width", "config": {"ratio": 0.25, "num_samples": 4, "seq_len": 16}},
    "heads": {"name": "prune.heads", "config": {"ratio": 0.5, "num_samples": 4, "seq_len": 16}},
    "depth": {"name": "prune.depth", "config": {"num_layers": 1, "num_samples": 4, "seq_len": 16}},
}


@pytest.fixture(scope="module")
def synthetic_boolq(tmp_path_factory):
    """BoolQ-shaped rows served through `use_exported` (the GPU machine has no pyarrow for the real files)."""
    from optforge.evals import datasets

    words = "the model reads a passage about rivers and mountains then answers a question about it".split()
    rows = [{"passage": " ".join(words[(i + j) % len(words)] for j in range(40))} for i in range(2100)]
    path = tmp_path_factory.mktemp("data") / "boolq.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"boolq/validation": rows}, f)
    datasets.use_exported(path)
    yield path
    datasets.use_exported(None)


@pytest.mark.parametrize("name", list(PASSES))
def test_calibrated_pass_runs_on_cuda(name, tiny_model_dir, make_recipe, tmp_path, synthetic_boolq):
    import optforge
    from optforge.model_io import load_model

    recipe = make_recipe(tiny_model_dir, tmp_path / "out", gate_pct=None, passes=[PASSES[name]])
    result = optforge.build(recipe, cache_dir=tmp_path / "cache", device="cuda")
    model, _ = load_model(result.output)  # CPU
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert result.manifest["passes"][0]["name"] == PASSES[name]["name"]
