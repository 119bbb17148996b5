"""Fixtures for the quantization pass tests: tiny-model builds shared by the module's tests."""

import pytest


@pytest.fixture
def build_tiny(tiny_model_dir, tmp_path_factory, make_recipe):
    """build_tiny(passes) -> BuildResult of the tiny Llama through `passes`, with one cache for the session."""
    import optforge

    root = tmp_path_factory.getbasetemp() / "quant"

    def run(passes: list, name: str = "out"):
        return optforge.build(make_recipe(tiny_model_dir, root / name, gate_pct=None, passes=passes), cache_dir=root / "cache")

    return run
