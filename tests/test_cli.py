"""The CLI: exit codes (0 ok, 2 bad input, 3 gate failed), messages, and a light `--help`."""

import subprocess
import sys

import yaml
from typer.testing import CliRunner

from optforge.cli import app

runner = CliRunner()


def _recipe_file(tmp_path, data) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_help_does_not_import_torch():
    code = "import sys, optforge.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    out = subprocess.run([sys.executable, "-m", "optforge.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "build" in out.stdout and "inspect" in out.stdout


def test_build_ok_then_inspect(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    out = tmp_path / "art"
    path = _recipe_file(tmp_path, make_recipe(tiny_model_dir, out))
    result = runner.invoke(app, ["build", path, "--cache-dir", str(cache_dir)])
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file()
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0 and "hashes verified" in result.output


def test_misspelt_key_exits_2_with_suggestion(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    data = make_recipe(tiny_model_dir, tmp_path / "art")
    data["passes"][0]["gate"] = {"metric": "perplexity", "max_increse_pct": 1.0}
    result = runner.invoke(app, ["build", _recipe_file(tmp_path, data), "--cache-dir", str(cache_dir)])
    assert result.exit_code == 2
    assert "max_increase_pct" in result.output and "Did you mean" in result.output


def test_failed_gate_exits_3_and_names_the_pass(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    out = tmp_path / "art"
    data = make_recipe(tiny_model_dir, out, passes=[{"name": "test.scramble", "gate": {"metric": "perplexity", "max_increase_pct": 0.5}}])
    result = runner.invoke(app, ["build", _recipe_file(tmp_path, data), "--cache-dir", str(cache_dir)])
    assert result.exit_code == 3
    assert "test.scramble" in result.output and "perplexity" in result.output
    assert not out.exists()


def test_missing_recipe_and_missing_artifact_exit_2(tmp_path):
    assert runner.invoke(app, ["build", str(tmp_path / "none.yaml")]).exit_code == 2
    assert runner.invoke(app, ["inspect", str(tmp_path)]).exit_code == 2


def test_passes_lists_registered_passes():
    result = runner.invoke(app, ["passes"])
    assert result.exit_code == 0
    assert "quant.int8_weight_only" in result.output and "exclude" in result.output
