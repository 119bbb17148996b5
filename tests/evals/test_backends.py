"""Perplexity through the runtime equals HF's (one definition, evals/perplexity.py), `auto` picks the runtime
from config.json alone, the eval table and reports show the backend, and a gate on a metric the backend cannot
measure exits 2."""

from __future__ import annotations

import json
import logging

import pytest
from typer.testing import CliRunner

from optforge.cache import Cache
from optforge.cli import app
from optforge.errors import RecipeError
from optforge.evals import backends
from optforge.evals.backends import resolve_backend, runtime_refusal
from optforge.evaluation import run_evals
from optforge.recipe import EvalSpec, ModelSpec, PerplexitySpec, parse_recipe
from optforge.sources import resolve_source


def test_runtime_perplexity_equals_hf_perplexity(tiny_model_dir, cache_dir):
    cache = Cache(cache_dir)
    artifact, _ = resolve_source(ModelSpec(source=str(tiny_model_dir)), cache)
    ppl = PerplexitySpec(rows=(0, 12), max_length=96)
    by_backend = {b: run_evals(artifact, EvalSpec(perplexity=ppl, backend=b), dtype="float32", cache=cache)[0]["perplexity"] for b in ("hf", "runtime")}
    hf, runtime = by_backend["hf"], by_backend["runtime"]
    assert (hf["backend"], runtime["backend"]) == ("hf", "runtime")
    assert runtime["per_example"]["tokens"] == hf["per_example"]["tokens"] and runtime["tokens"] == hf["tokens"] > 12
    assert runtime["value"] == pytest.approx(hf["value"], rel=1e-4)
    assert runtime["per_example"]["nll"] == pytest.approx(hf["per_example"]["nll"], rel=1e-4)


def _config(folder, **fields):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(fields))
    return folder


def test_auto_is_the_runtime_where_it_runs_the_model_else_hf_said_once(tmp_path, tiny_model_dir, caplog, monkeypatch):
    monkeypatch.setattr(backends, "_logged", set())  # once per process: forget what earlier tests said
    assert runtime_refusal(tiny_model_dir) is None and resolve_backend("auto", tiny_model_dir) == "runtime"
    assert runtime_refusal(_config(tmp_path / "qwen2", model_type="qwen2", sliding_window=4096, use_sliding_window=False)) is None
    assert runtime_refusal(_config(tmp_path / "mistral", model_type="mistral", sliding_window=4096)) is None  # windows run
    capped = _config(tmp_path / "capped", model_type="gemma3_text", attn_logit_softcapping=50.0)
    assert "attn_logit_softcapping" in runtime_refusal(capped)
    gemma = _config(tmp_path / "gemma", model_type="gemma3")
    with caplog.at_level(logging.INFO, logger="optforge.evals.backends"):
        assert resolve_backend("auto", gemma) == resolve_backend("auto", gemma) == "hf"
    said = [r.getMessage() for r in caplog.records if "HF transformers" in r.getMessage()]
    assert said == ["evaluating with HF transformers: the runtime does not run gemma3 models"]
    assert resolve_backend("hf", tiny_model_dir) == "hf" and resolve_backend("onnx", gemma) == "onnx"


def test_the_default_backend_is_auto_and_the_table_shows_the_backend(tiny_model_dir, cache_dir):
    assert EvalSpec().backend == "auto"
    args = ["eval", str(tiny_model_dir), "--rows", "0:4", "--max-length", "64", "--cache-dir", str(cache_dir)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "backend" in result.output and "perplexity:" in result.output and "runtime" in result.output


def test_the_report_shows_the_backend_of_each_metric(make_recipe, tiny_model_dir, tmp_path, cache_dir):
    from optforge.pipeline import build

    recipe = make_recipe(tiny_model_dir, tmp_path / "out")
    recipe["data"]["eval"]["perplexity"] = {"rows": [0, 4], "max_length": 64}
    result = build(recipe, cache_dir=cache_dir)
    assert result.manifest["source"]["metrics"]["perplexity"]["backend"] == "runtime"
    md = (result.output / "report.md").read_text()
    assert "| metric | value | stderr | n | backend |" in md and "perplexity [runtime]" in md
    assert "<th>backend</th>" in (result.output / "report.html").read_text()


@pytest.mark.parametrize("gate, listed", [("triviaqa.exact_match", {"tasks": [{"name": "triviaqa", "limit": 2}]}), ("prompts.exact_match", None)])
def test_a_gate_on_a_metric_the_backend_cannot_measure_is_refused(gate, listed, make_recipe, tiny_model_dir, tmp_path):
    recipe = make_recipe(tiny_model_dir, tmp_path / "out", passes=[{"name": "quant.int8_weight_only", "gate": {"metric": gate, "max_drop": 5.0}}])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello"}\n')
    recipe["data"]["eval"].update(listed or {"prompts": {"path": str(prompts)}}, backend="onnx")
    with pytest.raises(RecipeError, match=f"gate reads '{gate}', but data.eval.backend onnx cannot measure"):
        parse_recipe(recipe)
    path = tmp_path / "recipe.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(recipe))
    result = CliRunner().invoke(app, ["build", str(path)])
    assert result.exit_code == 2 and "does not generate" in result.output


def test_eval_cli_refuses_what_the_backend_cannot_measure(tiny_model_dir, cache_dir):
    result = CliRunner().invoke(app, ["eval", str(tiny_model_dir), "--tasks", "triviaqa", "--backend", "onnx", "--cache-dir", str(cache_dir)])
    assert result.exit_code == 2 and "cannot measure 'triviaqa'" in result.output


def test_a_malformed_prompts_line_exits_2_naming_the_line(make_recipe, tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello"}\n{"prompt": "Bye"\n')
    recipe = make_recipe(tiny_model_dir, tmp_path / "out")
    recipe["data"]["eval"]["prompts"] = {"path": str(prompts)}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    result = CliRunner().invoke(app, ["build", str(path)])
    words = " ".join(result.output.split())  # the console wraps long lines wherever the temporary path's length puts them
    assert result.exit_code == 2 and "line 2: not valid JSON" in words and "data.eval.prompts.path" in words
