"""`optforge eval --tasks ... --limit ... --json`: results with per-example values, cached on the rerun."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from optforge.cli import app

runner = CliRunner()


def test_eval_tasks_json_and_cache(tiny_model_dir, cache_dir, tmp_path):
    out = tmp_path / "evals.json"
    args = ["eval", str(tiny_model_dir), "--tasks", "arc_easy,winogrande", "--limit", "3", "--cache-dir", str(cache_dir), "--json", str(out)]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    results = json.loads(out.read_text())
    assert set(results) == {"arc_easy.acc", "arc_easy.acc_norm", "winogrande.acc"}
    assert results["arc_easy.acc"]["n"] == 3 and len(results["arc_easy.acc"]["per_example"]["correct"]) == 3
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "cached" in second.output


def test_eval_unknown_task_exits_2_with_a_suggestion(tiny_model_dir, cache_dir):
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--tasks", "hellaswg", "--cache-dir", str(cache_dir)])
    assert result.exit_code == 2
    assert "hellaswag" in result.output
