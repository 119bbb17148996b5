"""The quickstart on the real SmolLM2-135M-Instruct: size, quality, cache reuse, and a gate that cannot pass."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from optforge.artifact import ModelArtifact

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _build(recipe: Path, out: Path, cache: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "optforge.cli", "build", str(recipe), "--output", str(out), "--cache-dir", str(cache)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def quickstart(smollm2_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "smollm2-int8"
    first = _build(REPO / "recipes" / "quickstart.yaml", out, smollm2_cache)
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    second = _build(REPO / "recipes" / "quickstart.yaml", out, smollm2_cache)
    assert second.returncode == 0, second.stderr[-3000:]
    return out, manifest, json.loads((out / "manifest.json").read_text())


def test_int8_artifact_is_small_and_within_one_percent(quickstart, smollm2_cache):
    out, manifest, _ = quickstart
    source_dirs = [p for p in (smollm2_cache / "sources").iterdir() if p.is_dir() and not p.name.startswith(".")]
    source_bytes = min(ModelArtifact.open(p).weight_bytes() for p in source_dirs)  # the fp32 conversion
    weight_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert weight_bytes <= 0.45 * source_bytes, (weight_bytes, source_bytes)
    gate = manifest["passes"][0]["gate"]
    assert gate["passed"] and abs(gate["measured"] / gate["baseline"] - 1) < 0.01
    assert 10 < gate["baseline"] < 40  # SmolLM2-135M on BoolQ passages: ~22


def test_rebuild_comes_from_cache(quickstart):
    _, first, second = quickstart
    assert all(p["cached"] for p in second["passes"])
    assert second["passes"][0]["gate"] == first["passes"][0]["gate"]


def test_gate_that_cannot_pass_exits_3(quickstart, smollm2_cache, tmp_path):
    data = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    data["passes"][0]["gate"]["max_increase_pct"] = 0.0
    recipe = tmp_path / "strict.yaml"
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "strict-out"
    result = _build(recipe, out, smollm2_cache)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "quant.int8_weight_only" in result.stderr
    assert not out.exists()
