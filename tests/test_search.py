"""`optforge search` (optforge/search.py) on the tiny model: every candidate built and judged, the smallest that
passes published with its search page and manifest section, a rerun served from the cache; exit 3 naming the
closest candidate when none passes; the order, skipping and per-layer fallback of the candidate loop."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import optforge.search as search_mod
from optforge.cli import app
from optforge.search import SearchFailed, search


def _recipe(model_dir, out, steps, gates, **search):
    return {
        "name": "tiny-search",
        "model": {"source": str(model_dir), "dtype": "float32"},
        "data": {"calibration": {"dataset": "boolq", "rows": [2000, 2004], "max_length": 32},
                 "eval": {"perplexity": {"rows": [0, 40], "max_length": 48, "batch_size": 8}}},
        "search": {"steps": steps, "gates": gates, **search},
        "output": str(out),
    }


STEPS = {"quant": ["quant.int8_weight_only", {"name": "quant.rtn", "config": {"bits": 4}, "grid": {"group_size": [32, 64]}}, "quant.fp8"]}
PPL_GATE = [{"metric": "perplexity", "max_increase_pct": 5.0}]


def test_every_candidate_is_judged_and_the_smallest_passing_one_is_published(tiny_model_dir, tmp_path, cache_dir):
    recipe = _recipe(tiny_model_dir, tmp_path / "out", STEPS, PPL_GATE, exhaustive=True)
    result = search(recipe, cache_dir=cache_dir)
    labels = [c["label"] for c in result.candidates]
    assert sorted(labels) == sorted(["quant.int8_weight_only", "quant.rtn(bits=4, group_size=32)", "quant.rtn(bits=4, group_size=64)", "quant.fp8"])
    assert labels[:2] == ["quant.rtn(bits=4, group_size=32)", "quant.rtn(bits=4, group_size=64)"]  # fewest bits first
    assert all(c["status"] == "passed" and c["gates"][0]["metric"] == "perplexity" for c in result.candidates)
    smallest = min(result.candidates, key=lambda c: c["weight_bytes"])
    assert result.chosen["label"] == smallest["label"] == "quant.rtn(bits=4, group_size=64)"
    assert 4.0 < smallest["bits_per_weight"] < 5.0 and 8.0 < next(c for c in result.candidates if c["label"] == "quant.fp8")["bits_per_weight"] < 9.0
    manifest = json.loads((result.output / "manifest.json").read_text())
    assert manifest["search"]["chosen"] == smallest["label"] and len(manifest["search"]["candidates"]) == 4
    assert manifest["passes"][-1]["name"] == "quant.rtn" and manifest["passes"][-1]["config"]["group_size"] == 64
    assert {"search.html", "search.md"} <= {row["path"] for row in manifest["files"]}
    page = (result.output / "search.html").read_text()
    assert "<svg" in page and "Pareto front" in page and all(label in page for label in labels)
    again = search(recipe, cache_dir=cache_dir)  # everything from the cache
    assert again.chosen["label"] == result.chosen["label"] and again.seconds < 0.5 * result.seconds


def test_no_passing_candidate_exits_3_naming_the_closest(tiny_model_dir, tmp_path, cache_dir):
    steps = {"quant": [{"name": "test.scramble", "config": {"noise": 50.0}}, {"name": "test.scramble", "config": {"noise": 10.0}}]}
    recipe = _recipe(tiny_model_dir, tmp_path / "out", steps, PPL_GATE)
    with pytest.raises(SearchFailed) as failed:
        search(recipe, cache_dir=cache_dir)
    assert failed.value.exit_code == 3 and "closest was test.scramble(noise=10.0)" in str(failed.value) and "perplexity" in str(failed.value)
    assert not (tmp_path / "out").exists()
    path = tmp_path / "search.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    cli = CliRunner().invoke(app, ["search", str(path), "--cache-dir", str(cache_dir)])
    text = " ".join(cli.output.split())
    assert cli.exit_code == 3 and "search failed" in text and "test.scramble(noise=10.0)" in text


def test_an_objective_on_an_unmeasured_metric_is_bad_input(tiny_model_dir, tmp_path, cache_dir):
    path = tmp_path / "search.yaml"
    import yaml

    path.write_text(yaml.safe_dump(_recipe(tiny_model_dir, tmp_path / "out", STEPS, PPL_GATE, objective="decode_tok_s")))
    cli = CliRunner().invoke(app, ["search", str(path), "--cache-dir", str(cache_dir)])
    assert cli.exit_code == 2 and "no search gate measures it" in " ".join(cli.output.split())


def test_the_loop_skips_what_cannot_win_and_falls_back_layer_by_layer(tiny_model_dir, tmp_path, cache_dir, monkeypatch):
    """Fake judging: int4 without INT8 layers fails, with 2 or more passes; sizes grow with bits and INT8 layers."""
    seen = []

    def fake_evaluate(shared, recipe, cand, *, sequential, source_decoder_weights):
        seen.append(cand.label)
        cand.weight_bytes = 1000 * cand.nominal_bits + 100 * len(cand.int8_layers)
        cand.status = "passed" if cand.nominal_bits == 8 or len(cand.int8_layers) >= 2 else "failed"
        verdict = "pass" if cand.status == "passed" else "fail"
        cand.gates = [{"metric": "perplexity", "passed": verdict == "pass", "verdict": verdict, "drop": 1.0 if verdict == "pass" else 9.0,
                       "ci_low": 0.5, "ci_high": 1.5 if verdict == "pass" else 12.0, "max_drop": 5.0, "n": 40}]
        cand._artifact, cand._records = shared.source, []
        return cand

    def fake_fallback(shared, recipe, failed, memo=None):
        last = failed.passes[-1]
        return [search_mod.Candidate(-1, [{"name": last["name"], "config": {**last["config"], "int8_layers": [f"layers.{k}"]}}], int8_layers=list(range(k)))
                for k in (1, 2, 4)]

    monkeypatch.setattr(search_mod, "evaluate_candidate", fake_evaluate)
    monkeypatch.setattr(search_mod, "_fallback_candidates", fake_fallback)
    steps = {"quant": ["quant.int8_weight_only", {"name": "quant.rtn", "config": {"bits": 4, "group_size": 32}}]}
    result = search(_recipe(tiny_model_dir, tmp_path / "out", steps, PPL_GATE, fallback={"for": ["quant.rtn"]}), cache_dir=cache_dir)
    assert seen == ["quant.rtn(bits=4, group_size=32)", "quant.rtn(bits=4, group_size=32) + layers 0 at int8",
                    "quant.rtn(bits=4, group_size=32) + layers 0,1 at int8"]  # 4 layers not tried; int8 cannot be smaller
    assert result.chosen["int8_layers"] == [0, 1]
    skipped = [c for c in result.candidates if c["status"] == "not evaluated"]
    assert [c["label"] for c in skipped] == ["quant.int8_weight_only"]


def test_a_tie_on_the_objective_goes_to_the_most_room_under_the_tightest_gate():
    tight = search_mod.Candidate(0, [], gates=[{"metric": "perplexity", "drop": 0.1, "max_drop": 3.0}, {"metric": "arc", "drop": 1.6, "max_drop": 2.0}])
    loose = search_mod.Candidate(1, [], gates=[{"metric": "perplexity", "drop": 0.9, "max_drop": 3.0}, {"metric": "arc", "drop": 0.4, "max_drop": 2.0},
                                               {"metric": "decode_tok_s", "speedup": 1.1, "drop": 5.0, "max_drop": 1.0}])
    assert search_mod._tightest_gate(tight) == pytest.approx(0.8) and search_mod._tightest_gate(loose) == pytest.approx(0.3)


def test_a_candidate_the_speed_backend_cannot_run_is_reported_not_servable(tiny_model_dir, tmp_path, cache_dir):
    from optforge.runtime.cpp import BUILD_HINT, is_available

    if not is_available():
        pytest.skip(f"C++ runtime extension not built: {BUILD_HINT}")
    recipe = _recipe(tiny_model_dir, tmp_path / "out", {"quant": ["quant.fp8", "quant.int8_weight_only"]},
                     PPL_GATE + [{"metric": "decode_tok_s", "min_speedup": 0.02}], exhaustive=True)  # any speed: the tiny model is noise
    recipe["data"]["speed"] = {"input_len": 8, "output_len": 4, "num_requests": 2, "repeats": 3, "backend": "cpp", "threads": 1}
    result = search(recipe, cache_dir=cache_dir)
    fp8 = next(c for c in result.candidates if c["label"] == "quant.fp8")
    assert fp8["status"] == "not servable" and "cpp" in fp8["reason"], fp8["reason"]
    assert result.chosen["label"] == "quant.int8_weight_only"


def test_fallback_candidates_rank_layers_once_and_cache_the_ranking(tiny_model_dir, tmp_path, cache_dir, monkeypatch):
    import optforge.sensitivity as sensitivity
    from optforge.pipeline import load_job, prepare

    calls = []
    real = sensitivity.layer_sensitivities
    monkeypatch.setattr(sensitivity, "layer_sensitivities", lambda *a, **k: calls.append(1) or real(*a, **k))
    recipe = _recipe(tiny_model_dir, tmp_path / "out", {"quant": [{"name": "quant.rtn", "config": {"bits": 4, "group_size": 32}}]}, PPL_GATE,
                     fallback={"for": ["quant.rtn"], "max_layers": 2, "rows": 2})
    job = load_job(recipe, output=None, cache_dir=cache_dir, device="cpu", progress=None, force=False)
    failed = search_mod.Candidate(0, [{"name": "quant.rtn", "config": {"bits": 4, "group_size": 32}}])
    shared, _ = prepare(job, search_mod.candidate_recipe(job.recipe, failed, sequential=True))
    first = search_mod._fallback_candidates(shared, job.recipe, failed)
    again = search_mod._fallback_candidates(shared, job.recipe, failed)  # a new search: the ranking comes from the cache
    assert len(calls) == 1 and [c.int8_layers for c in first] == [c.int8_layers for c in again]
    assert [len(c.int8_layers) for c in first] == [1, 2] and first[0].passes[0]["config"]["int8_layers"] == [rf"(^|\.)layers\.{first[0].int8_layers[0]}\."]
