"""data.eval.backend (auto | hf | runtime | cpp | onnx): the backend keys the eval cache (hf keeps the keys it
had before backends existed), every metric names the backend that produced it, and so do the manifest and
`optforge eval`; perplexity through the runtime equals HF's; auto picks the runtime where it runs the model."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from optforge.cache import Cache
from optforge.cli import app
from optforge.evaluation import run_evals, task_cache_key
from optforge.hashing import sha256_json
from optforge.pipeline import build
from optforge.recipe import EvalSpec, ModelSpec, TaskSpec
from optforge.sources import resolve_source


def test_the_backend_keys_the_cache_and_names_each_metric(tiny_model_dir, cache_dir):
    from optforge.evals.tasks import TASKS_VERSION

    cache = Cache(cache_dir)
    artifact, _ = resolve_source(ModelSpec(source=str(tiny_model_dir)), cache)
    task = TaskSpec(name="arc_easy", limit=4)
    before_backends = sha256_json({"model": artifact.digest, "task": "arc_easy", "rows": [0, 4], "dtype": "float32", "v": TASKS_VERSION})
    assert task_cache_key(artifact, task, "float32") == task_cache_key(artifact, task, "float32", "hf") == before_backends
    assert len({task_cache_key(artifact, task, "float32", b) for b in ("hf", "runtime", "cpp")}) == 3

    by_backend = {}
    for backend in ("hf", "runtime"):
        spec = EvalSpec(perplexity=None, tasks=[task], backend=backend)
        results, cached = run_evals(artifact, spec, dtype="float32", cache=cache)
        assert not cached and {r["backend"] for r in results.values()} == {backend}
        by_backend[backend] = results
        again, cached = run_evals(artifact, spec, dtype="float32", cache=cache)
        assert cached and again == results
    for metric in ("arc_easy.acc", "arc_easy.acc_norm"):
        assert by_backend["runtime"][metric]["per_example"] == by_backend["hf"][metric]["per_example"]


def test_the_manifest_names_the_backend_of_each_metric(make_recipe, tiny_model_dir, tmp_path, cache_dir):
    recipe = make_recipe(tiny_model_dir, tmp_path / "out", passes=[{"name": "quant.int8_weight_only", "gate": {"metric": "arc_easy.acc", "max_drop": 100.0}}])
    recipe["data"]["eval"].update(tasks=[{"name": "arc_easy", "limit": 4}], backend="runtime")
    manifest = build(recipe, cache_dir=cache_dir).manifest
    for metrics in (manifest["source"]["metrics"], manifest["passes"][0]["metrics"]):
        assert metrics["arc_easy.acc"]["backend"] == "runtime" and metrics["perplexity"]["backend"] == "runtime"


def test_eval_cli_takes_a_backend(tiny_model_dir, cache_dir, tmp_path):
    out = tmp_path / "evals.json"
    args = ["eval", str(tiny_model_dir), "--tasks", "arc_easy", "--limit", "3", "--backend", "runtime", "--cache-dir", str(cache_dir), "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["arc_easy.acc"]["backend"] == "runtime"
    bad = CliRunner().invoke(app, [*args[:6], "--backend", "vllm", "--cache-dir", str(cache_dir)])
    assert bad.exit_code == 2 and "backend" in bad.output
