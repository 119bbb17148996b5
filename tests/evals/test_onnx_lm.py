"""The onnx eval backend on a tiny model exported by the export.onnx pass: the same log-likelihoods as HFLM
(within 1e-4 nats per scored token, fp32), the same choices on a task, the same perplexity (1e-4 relative); an
artifact without model.onnx exits 2 naming the pass that writes it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from optforge.artifact import ModelArtifact
from optforge.cache import Cache
from optforge.cli import app
from optforge.evals.lm import LoglikelihoodRequest, load_lm
from optforge.evals.onnx_lm import OnnxLM
from optforge.evaluation import run_evals
from optforge.recipe import EvalSpec, PerplexitySpec, TaskSpec

pytest.importorskip("onnxruntime", reason="the onnx eval backend needs onnxruntime (pip install onnxruntime)")

LOGPROB_TOL = 1e-4  # nats per scored token: the exported graph's logits are within 1e-4 of PyTorch's (fp32)


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory) -> ModelArtifact:
    from optforge.pipeline import build

    out = tmp_path_factory.mktemp("onnx-eval") / "artifact"
    recipe = {"name": "tiny-onnx-eval", "model": {"source": str(tiny_model_dir)}, "data": {"calibration": None, "eval": {"perplexity": None}},
              "passes": [{"name": "export.onnx"}], "output": str(out)}
    build(recipe, cache_dir=tmp_path_factory.getbasetemp() / "onnx-eval-cache")
    return ModelArtifact.open(out)


def test_loglikelihoods_match_hflm(exported):
    requests = [LoglikelihoodRequest(ctx, cont) for ctx, conts in [
        ("Paris is the capital of", [" France", " Germany", " the lazy dog"]),
        ("def add(a, b):\n", ["    return a + b", "    pass"]),
        ("", ["The quick brown fox"]),
        ("Numbers like 12345 ", ["and 3.14159"]),
    ] for cont in conts]
    hf = load_lm(exported.path).loglikelihood(requests)
    onnx = OnnxLM.from_path(exported.path, batch_size=2).loglikelihood(requests)
    for a, b in zip(hf, onnx):
        assert b.logprob == pytest.approx(a.logprob, abs=LOGPROB_TOL * a.num_tokens) and (b.is_greedy, b.num_tokens) == (a.is_greedy, a.num_tokens)


def test_onnx_backend_scores_a_task_and_perplexity_like_hf(exported, tmp_path):
    cache = Cache(tmp_path / "cache")
    spec = EvalSpec(perplexity=PerplexitySpec(rows=(0, 6), max_length=64), tasks=[TaskSpec(name="arc_easy", limit=6)])
    hf, _ = run_evals(exported, spec.model_copy(update={"backend": "hf"}), dtype="float32", cache=cache)
    onnx, cached = run_evals(exported, spec.model_copy(update={"backend": "onnx"}), dtype="float32", cache=cache)
    assert not cached and {r["backend"] for r in onnx.values()} == {"onnx"}
    for metric in ("arc_easy.acc", "arc_easy.acc_norm"):
        assert onnx[metric]["per_example"] == hf[metric]["per_example"]
    assert onnx["perplexity"]["value"] == pytest.approx(hf["perplexity"]["value"], rel=1e-4)
    assert onnx["perplexity"]["per_example"]["tokens"] == hf["perplexity"]["per_example"]["tokens"]


def test_eval_cli_onnx_backend_and_an_artifact_without_the_graph(exported, tiny_model_dir, tmp_path):
    out = tmp_path / "evals.json"
    args = ["eval", str(exported.path), "--tasks", "arc_easy", "--limit", "2", "--backend", "onnx", "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["arc_easy.acc"]["backend"] == "onnx" and "onnx" in result.output
    missing = CliRunner().invoke(app, ["eval", str(tiny_model_dir), *args[2:]])
    assert missing.exit_code == 2 and "no model.onnx" in missing.output and "export.onnx" in missing.output
