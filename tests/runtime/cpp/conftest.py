"""Fixtures of the C++ runtime tests: the compiled module (skips with the build command when missing) and
artifacts of the shared tiny Llama with a manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from optforge.hashing import file_table


@pytest.fixture(scope="session")
def rt():
    from optforge.runtime.cpp import BUILD_HINT, is_available, load

    if not is_available():
        pytest.skip(f"C++ runtime extension not built: {BUILD_HINT}")
    return load()


def with_manifest(src: Path, dst: Path) -> Path:
    """A copy of `src` with a manifest.json listing every file (what `optforge build` writes)."""
    shutil.copytree(src, dst)
    (dst / "manifest.json").write_text(json.dumps({"schema_version": 1, "files": file_table(dst)}))
    return dst


@pytest.fixture()
def tiny_artifact(tiny_model_dir, tmp_path) -> Path:
    return with_manifest(tiny_model_dir, tmp_path / "artifact")


def _matches_torch(rt, path: Path, prompts: list[list[int]], tol: float, num_new: int, fmt: str = "int8") -> None:
    """The C++ engine on a weight-only artifact: its weight format (`fmt`, fp32 activations), each prompt's last
    logits within `tol` of the torch model's, and `num_new` greedy tokens equal to the torch runtime's."""
    import numpy as np
    import torch

    from optforge.model_io import load_model
    from optforge.runtime.llm import LLM
    from optforge.runtime.sequence import SamplingParams

    engine = rt.Engine(str(path), num_threads=2)
    assert (engine.weight_format, engine.activations) == (fmt, "fp32")
    model, _ = load_model(path, dtype="float32", device="cpu")
    for ids in prompts[:3]:
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1].numpy()
        assert np.abs(engine.last_logits(ids) - ref).max() < tol
    params = SamplingParams(max_tokens=num_new, ignore_eos=True)
    torch_outs = LLM(path, enable_prefix_caching=False).generate(prompts, params)
    cpp_outs = LLM(path, backend="cpp", num_threads=2, block_size=4).generate(prompts, params)
    assert [o.token_ids for o in cpp_outs] == [o.token_ids for o in torch_outs]


@pytest.fixture(scope="session")
def matches_torch():
    """`_matches_torch(rt, path, prompts, tol, num_new)`: the C++ engine against the torch runtime on one artifact."""
    return _matches_torch
