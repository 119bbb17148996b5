"""recipes/smollm2-int8-speed.yaml on the real SmolLM2-135M-Instruct: the speed gate decides (pass, or exit 3 naming
the pass, metric, ratio and interval; which one depends on the machine), and a rebuild reuses the timings."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _build(out: Path, cache: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "optforge.cli", "build", str(REPO / "recipes" / "smollm2-int8-speed.yaml"), "--output", str(out), "--cache-dir", str(cache)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env={"COLUMNS": "400", **__import__("os").environ})


def test_the_speed_gate_decides_and_a_rebuild_reuses_the_timings(smollm2_cache, tmp_path):
    out = tmp_path / "speed"
    first = _build(out, smollm2_cache)
    assert first.returncode in (0, 3), first.stderr[-3000:]
    text = " ".join((first.stdout + first.stderr).split())
    ratio = re.search(r"decode_tok_s: baseline \S+, measured \S+; speedup [\d.]+x \[[\d.]+, [\d.]+\]", text)
    assert ratio, text[-3000:]
    if first.returncode == 3:
        assert "gate failed in pass quant.int8_weight_only" in text and not out.exists()
    second = _build(out, smollm2_cache)
    assert second.returncode == first.returncode
    assert ratio.group(0) in " ".join((second.stdout + second.stderr).split())  # the same rounds, from the cache
