"""recipes/smollm2-int8-cpp-speed.yaml on the real SmolLM2-135M-Instruct: the decode speed gate on the C++ backend
decides (pass, or exit 3 naming the pass, metric, ratio and interval; which one depends on the machine) with the
weight-only artifact served as weight-only (float32 activations)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.slow


def test_the_cpp_speed_gate_decides_on_the_weight_only_artifact(rt, smollm2_cache, tmp_path):
    out = tmp_path / "cpp-speed"
    cmd = [sys.executable, "-m", "optforge.cli", "build", str(REPO / "recipes" / "smollm2-int8-cpp-speed.yaml"), "--output", str(out), "--cache-dir", str(smollm2_cache)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env={**os.environ, "COLUMNS": "400"})
    assert done.returncode in (0, 3), done.stderr[-3000:]
    text = " ".join((done.stdout + done.stderr).split())
    assert re.search(r"decode_tok_s: baseline \S+, measured \S+; speedup [\d.]+x \[[\d.]+, [\d.]+\]", text), text[-3000:]
    if done.returncode == 3:
        assert "gate failed in pass quant.int8_weight_only" in text and not out.exists()
    else:
        assert rt.Engine(str(out), num_threads=1).activations == "fp32"
