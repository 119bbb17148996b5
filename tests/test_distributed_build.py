"""Builds over two processes (torchrun, gloo on the CPU): GPTQ and AWQ calibrated on two shards of the
calibration data with their statistics all-reduced give the one-process artifact within float rounding and the
same gate verdicts, and `optforge build --nproc 2` keeps the exit code of a failing gate (3) and writes nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file


def _recipe(tmp_path, make_recipe, tiny_model_dir, step: dict, gate_pct: float) -> str:
    recipe = make_recipe(tiny_model_dir, tmp_path / "unused", passes=[{**step, "gate": {"metric": "perplexity", "max_increase_pct": gate_pct}}])
    recipe["data"]["calibration"]["rows"] = [2000, 2008]  # 8 passages: 4 per process
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _build(recipe: str, out, cache, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "optforge", "build", recipe, "-o", str(out), "--cache-dir", str(cache), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("step", [{"name": "quant.gptq", "config": {"group_size": 32}}, {"name": "quant.awq", "config": {"group_size": 32}}], ids=["gptq", "awq"])
def test_two_processes_build_the_one_process_artifact(tmp_path, make_recipe, tiny_model_dir, step):
    recipe = _recipe(tmp_path, make_recipe, tiny_model_dir, step, gate_pct=50)
    two = _build(recipe, tmp_path / "two", tmp_path / "cache-two", "--nproc", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "running on 2 processes" in two.stderr
    one = _build(recipe, tmp_path / "one", tmp_path / "cache-one")
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    codes = [k for k in a if not a[k].is_floating_point()]
    assert codes and sum(torch.equal(a[k], b[k]) for k in codes) >= len(codes) - 1  # integer codes: the same (one tensor may flip a rounding tie)
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    gates = [yaml.safe_load((tmp_path / d / "manifest.json").read_text())["passes"][0]["gates"][0] for d in ("one", "two")]
    assert gates[0]["verdict"] == gates[1]["verdict"] == "pass"
    assert gates[0]["measured"] == pytest.approx(gates[1]["measured"], rel=1e-3)


def test_a_failing_gate_over_two_processes_exits_3_and_writes_nothing(tmp_path, make_recipe, tiny_model_dir):
    recipe = _recipe(tmp_path, make_recipe, tiny_model_dir, {"name": "quant.gptq", "config": {"bits": 4, "group_size": 32}}, gate_pct=0.0001)
    result = _build(recipe, tmp_path / "out", tmp_path / "cache", "--nproc", "2")
    assert result.returncode == 3, result.stderr[-3000:]
    assert "gate failed" in result.stderr and not (tmp_path / "out").exists()


def test_a_killed_two_process_build_resumes_and_builds_the_same_artifact(tmp_path, make_recipe, tiny_model_dir):
    import os

    from optforge.passes.layer_checkpoints import TEST_KILL_AFTER_LAYER

    recipe = _recipe(tmp_path, make_recipe, tiny_model_dir, {"name": "quant.gptq", "config": {"group_size": 32}}, gate_pct=50)
    whole = _build(recipe, tmp_path / "whole", tmp_path / "cache-whole", "--nproc", "2")
    assert whole.returncode == 0, whole.stderr[-3000:]
    cmd = [sys.executable, "-m", "optforge", "build", recipe, "-o", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--nproc", "2"]
    killed = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, TEST_KILL_AFTER_LAYER: "0"})
    assert killed.returncode != 0 and not (tmp_path / "out").exists()
    resumed = subprocess.run([*cmd, "-v"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming quant.gptq at layer 1 of 2" in resumed.stderr
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
