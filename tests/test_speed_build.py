"""Builds with speed gates on the tiny model: a slower candidate fails with exit 3 naming the pass, metric, ratio
and interval; a faster or equal one passes; the manifest names the machine; reports show quality and speed."""

import json
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import optforge
from optforge import speed
from optforge.cli import app
from optforge.errors import GateFailed

SPEED = {"input_len": 8, "output_len": 4, "concurrency": 1, "num_requests": 2, "repeats": 3, "threads": 1}


def _recipe(make_recipe, tiny_model_dir, out, speed_gate: dict) -> dict:
    gates = [{"metric": "perplexity", "max_increase_pct": 5.0}, speed_gate]
    data = make_recipe(tiny_model_dir, out, passes=[{"name": "quant.int8_weight_only", "gate": gates}])
    data["data"]["speed"] = dict(SPEED)
    return data


def _is_candidate(path) -> bool:
    return "passes" in Path(path).parts  # pass outputs live in the cache's passes/ folder; the source does not


def _fake_rounds(factor: float, calls: list):
    """A fake round: the candidate's decode rate is `factor` times the baseline's, with a little noise."""

    def run(path, spec, dtype):
        calls.append(path)
        base = 100.0 + len(calls) % 3
        return {"decode_tok_s": base * (factor if _is_candidate(path) else 1.0), "ttft_p90_s": 0.01}

    return run


def test_slower_candidate_fails_the_build_with_exit_3(make_recipe, tiny_model_dir, tmp_path, cache_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(speed, "run_round", _fake_rounds(0.6, calls))
    data = _recipe(make_recipe, tiny_model_dir, tmp_path / "out", {"metric": "decode_tok_s", "min_speedup": 1.2})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    junit = tmp_path / "gates.xml"
    result = CliRunner().invoke(app, ["build", str(path), "--cache-dir", str(cache_dir), "--junit", str(junit)])
    assert result.exit_code == 3, result.output
    text = " ".join(result.output.split())
    assert "quant.int8_weight_only" in text and "decode_tok_s" in text and "speedup 0.6" in text and "vs required 1.200x: fail" in text
    assert not (tmp_path / "out").exists() and len(calls) == 6
    assert "decode_tok_s" in junit.read_text() and "<failure" in junit.read_text()


def test_equal_speed_passes_a_lenient_gate_and_the_manifest_names_the_machine(make_recipe, tiny_model_dir, tmp_path, cache_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(speed, "run_round", _fake_rounds(1.0, calls))
    data = _recipe(make_recipe, tiny_model_dir, tmp_path / "out", {"metric": "decode_tok_s", "max_slowdown": 1.05})
    result = optforge.build(data, cache_dir=cache_dir)
    (rec,) = result.manifest["passes"]
    (timed,) = rec["speed"]
    assert timed["verdict"] == "pass" and timed["speedup"] == pytest.approx(1.0) and timed["kind"] == "speed"
    assert timed["machine"]["cores"] and timed["machine"]["torch"] and timed["workload"]["repeats"] == 3
    assert [g["metric"] for g in rec["gates"]] == ["perplexity", "decode_tok_s"]
    report = (result.output / "report.md").read_text()
    assert "## Quality and speed per pass" in report and "speedup 1.000x" in report and "interleaved rounds" in report

    def boom(*args):
        raise AssertionError("the speed should come from the cache")

    monkeypatch.setattr(speed, "run_round", boom)
    again = optforge.build(data, cache_dir=cache_dir)
    assert again.manifest["passes"][0]["speed"][0]["cached"] is True


def test_speed_against_the_source_and_quality_failure_skips_timing(make_recipe, tiny_model_dir, tmp_path, cache_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(speed, "run_round", _fake_rounds(2.0, calls))
    data = _recipe(make_recipe, tiny_model_dir, tmp_path / "out", {"metric": "decode_tok_s", "min_speedup": 1.5, "baseline": "source"})
    assert optforge.build(data, cache_dir=cache_dir).manifest["passes"][0]["speed"][0]["verdict"] == "pass"
    calls.clear()
    data["passes"] = [{"name": "test.scramble", "gate": [{"metric": "perplexity", "max_increase_pct": 1.0}, {"metric": "decode_tok_s", "min_speedup": 1.5}]}]
    with pytest.raises(GateFailed) as exc:
        optforge.build(data, cache_dir=cache_dir)
    assert exc.value.result["metric"] == "perplexity" and calls == []  # no time spent timing a model that failed on quality


def test_real_runtime_rounds_catch_an_injected_slowdown(make_recipe, tiny_model_dir, tmp_path, cache_dir, monkeypatch):
    """The real benchmark on the tiny model, each round a fresh engine; the candidate's engine sleeps 20 ms a step."""
    from optforge.runtime.llm import Engine

    real_round, real_step = speed.run_round, Engine.step

    def slow_step(self):
        time.sleep(0.02)
        return real_step(self)

    def run(path, spec, dtype):
        if _is_candidate(path):
            with monkeypatch.context() as m:
                m.setattr(Engine, "step", slow_step)
                return real_round(path, spec, dtype)
        return real_round(path, spec, dtype)

    monkeypatch.setattr(speed, "run_round", run)
    data = _recipe(make_recipe, tiny_model_dir, tmp_path / "out", {"metric": "throughput_tok_s", "max_slowdown": 1.5})
    with pytest.raises(GateFailed) as exc:
        optforge.build(data, cache_dir=cache_dir)
    assert exc.value.pass_name == "quant.int8_weight_only" and exc.value.exit_code == 3
    assert exc.value.result["kind"] == "speed" and exc.value.result["verdict"] == "fail" and exc.value.result["speedup_high"] < 1 / 1.5

    monkeypatch.setattr(speed, "run_round", real_round)
    data["passes"][0]["gate"][1] = {"metric": "peak_memory_gb", "max_slowdown": 10.0}
    timed = optforge.build(data, cache_dir=cache_dir).manifest["passes"][0]["speed"][0]
    assert timed["verdict"] == "pass" and timed["baseline"] > 0
    assert json.dumps(timed)  # plain JSON, as the manifest holds it


def test_cli_summary_shows_quality_and_speed_side_by_side(make_recipe, tiny_model_dir, tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(speed, "run_round", _fake_rounds(1.5, []))
    out = tmp_path / "out"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(make_recipe, tiny_model_dir, out, {"metric": "decode_tok_s", "min_speedup": 1.2})))
    runner = CliRunner(env={"COLUMNS": "400"})  # a wide table: no cell wraps
    result = runner.invoke(app, ["build", str(path), "--cache-dir", str(cache_dir)])
    assert result.exit_code == 0, result.output
    for output in (result.output, runner.invoke(app, ["inspect", str(out)]).output):
        text = " ".join(output.split())
        assert "quality" in text and "speed" in text and "perplexity" in text and "speedup 1.500x" in text
