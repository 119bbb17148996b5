"""`optforge serve` start-up: the context length against the model and the KV budget, the access options.

The tiny model (tests/conftest.py) has a context of 512 tokens and takes 512 bytes of fp32 KV per token, so
64KiB of KV cache holds 128 tokens. The server itself is replaced by a stub that records how it was called."""

import logging

import pytest
from typer.testing import CliRunner

from optforge.cli import app

cli = CliRunner()


@pytest.fixture
def served(monkeypatch):
    """What `optforge serve` would have served: the AsyncEngine and the server's options."""
    pytest.importorskip("aiohttp")
    import optforge.runtime.server as server

    calls = []
    monkeypatch.setattr(server, "serve", lambda engine, name, host, port, **options: calls.append((engine, options)))
    return calls


def words(result) -> str:
    return " ".join(result.output.split())


def test_max_model_len_beyond_the_model_is_refused(tiny_model_dir, served):
    result = cli.invoke(app, ["serve", str(tiny_model_dir), "--max-model-len", "1024"])
    assert result.exit_code == 2 and "--max-model-len 1024" in words(result) and "512" in words(result)
    assert served == []


def test_a_full_length_request_that_cannot_fit_the_kv_cache_is_refused(tiny_model_dir, served):
    result = cli.invoke(app, ["serve", str(tiny_model_dir), "--max-model-len", "256", "--kv-cache-memory", "64KiB"])
    text = words(result)
    assert result.exit_code == 2 and "--max-model-len" in text and "--kv-cache-memory" in text and "128 tokens" in text
    assert served == []


def test_default_max_model_len_is_what_fits_and_says_so(tiny_model_dir, served, caplog):
    with caplog.at_level(logging.INFO):
        result = cli.invoke(app, ["serve", str(tiny_model_dir), "--kv-cache-memory", "64KiB"])
    assert result.exit_code == 0, result.output
    (engine, _), = served
    assert engine.engine.config.max_model_len == 128 and engine.engine.max_context == 128
    assert "max_model_len 128" in caplog.text and "--kv-cache-memory" in caplog.text


def test_default_max_model_len_is_the_models_context(tiny_model_dir, served):
    result = cli.invoke(app, ["serve", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    (engine, options), = served
    assert engine.engine.config.max_model_len == 512  # min(max_position_embeddings, 4096)
    assert options == {"api_key": None, "allowed_origins": ()}


def test_bad_kv_cache_memory_is_refused(tiny_model_dir, served):
    result = cli.invoke(app, ["serve", str(tiny_model_dir), "--kv-cache-memory", "lots"])
    assert result.exit_code == 2 and "--kv-cache-memory" in words(result)


def test_api_key_from_the_environment_and_allowed_origins(tiny_model_dir, served, monkeypatch):
    monkeypatch.setenv("OPTFORGE_API_KEY", "k3y")
    result = cli.invoke(app, ["serve", str(tiny_model_dir), "--allowed-origins", "http://localhost:3000, http://127.0.0.1:3000"])
    assert result.exit_code == 0, result.output
    (_, options), = served
    assert options == {"api_key": "k3y", "allowed_origins": ("http://localhost:3000", "http://127.0.0.1:3000")}


@pytest.mark.parametrize("text,expected", [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("4096", 4096), ("64 kib", 65536)])
def test_parse_bytes(text, expected):
    from optforge.resources import parse_bytes

    assert parse_bytes(text) == expected
