"""Gates inside a build on the tiny model: manifest keys, report.md/html in the artifact, JUnit XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from optforge.artifact import verify_artifact
from optforge.errors import GateFailed
from optforge.pipeline import build


def _recipe(make_recipe, tiny_model_dir, out, gate: dict) -> dict:
    recipe = make_recipe(tiny_model_dir, out, passes=[{"name": "quant.int8_weight_only", "gate": gate}])
    recipe["data"]["eval"]["tasks"] = [{"name": "arc_easy", "limit": 6}]
    return recipe


def test_task_gate_writes_manifest_reports_and_junit(make_recipe, tiny_model_dir, tmp_path, cache_dir):
    # A random tiny model: the interval at n=6 is wide, so only a loose gate is sure to pass.
    recipe = _recipe(make_recipe, tiny_model_dir, tmp_path / "out", {"metric": "arc_easy.acc", "max_drop": 100.0})
    junit = tmp_path / "gates.xml"
    result = build(recipe, cache_dir=cache_dir, junit=junit)
    gate = result.manifest["passes"][0]["gate"]
    assert {"metric", "baseline", "measured", "threshold", "passed", "ci_low", "ci_high", "verdict", "n", "needed_n"} <= set(gate)
    assert gate["verdict"] == "pass" and gate["n"] == 6 and gate["method"] == "agresti_min"
    assert "per_example" not in result.manifest["passes"][0]["metrics"]["arc_easy.acc"]
    verify_artifact(result.output)  # the reports are listed in the manifest with their hashes
    md = (result.output / "report.md").read_text()
    assert "| arc_easy.acc |" in md and "pass" in md
    assert "<svg" in (result.output / "report.html").read_text()
    case = ET.parse(junit).getroot().find("testsuite/testcase")
    assert case.get("name") == "quant.int8_weight_only [arc_easy.acc]" and case.find("failure") is None


def test_failed_gate_still_writes_junit_and_nothing_else(make_recipe, tiny_model_dir, tmp_path, cache_dir):
    out = tmp_path / "out"
    recipe = _recipe(make_recipe, tiny_model_dir, out, {"metric": "arc_easy.acc", "max_drop": 0.0})
    junit = tmp_path / "gates.xml"
    with pytest.raises(GateFailed) as info:
        build(recipe, cache_dir=cache_dir, junit=junit)
    assert info.value.result["verdict"] in {"undecided", "fail"}
    assert not out.exists()
    failure = ET.parse(junit).getroot().find("testsuite/testcase/failure")
    assert failure is not None and "arc_easy.acc" in failure.text


def test_recipe_rejects_a_gate_on_a_task_it_does_not_evaluate(make_recipe, tiny_model_dir, tmp_path):
    from optforge.errors import RecipeError
    from optforge.recipe import parse_recipe

    recipe = make_recipe(tiny_model_dir, tmp_path / "out", passes=[{"name": "quant.int8_weight_only", "gate": {"metric": "hellaswag.acc", "max_drop": 1.0}}])
    with pytest.raises(RecipeError, match="hellaswag"):
        parse_recipe(recipe)


def test_boolq_task_rows_must_not_overlap_calibration(make_recipe, tiny_model_dir, tmp_path):
    from optforge.errors import RecipeError
    from optforge.recipe import parse_recipe

    recipe = make_recipe(tiny_model_dir, tmp_path / "out")
    recipe["data"]["eval"]["tasks"] = ["boolq"]
    with pytest.raises(RecipeError, match="overlap calibration"):
        parse_recipe(recipe)
    recipe["data"]["eval"]["tasks"] = [{"name": "boolq", "limit": 1000}]
    assert parse_recipe(recipe).data.eval.tasks[0].selected_rows(3270) == (0, 1000)
