"""The cache trusts content, not names or timestamps: corrupt entries are rebuilt, writers of one key are safe."""

import json
import multiprocessing
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import optforge
from optforge.cache import Cache
from optforge.cli import app

runner = CliRunner()


def _poison_keeping_mtime(weights) -> None:
    """Set every embedding to NaN and put the old mtime back, as `cp -p`, `rsync -t` or `tar` would."""
    st = os.stat(weights)
    state = load_file(weights)
    key = next(k for k in state if "embed_tokens" in k)
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, weights, metadata={"format": "pt"})
    assert os.stat(weights).st_size == st.st_size
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_tampered_pass_output_is_rebuilt_not_trusted(tiny_model_dir, tmp_path, cache_dir, make_recipe, caplog):
    first = optforge.build(make_recipe(tiny_model_dir, tmp_path / "a"), cache_dir=cache_dir)
    entry = cache_dir / "passes" / first.manifest["passes"][0]["cache_key"]
    _poison_keeping_mtime(entry / "model.safetensors")
    second = optforge.build(make_recipe(tiny_model_dir, tmp_path / "b"), cache_dir=cache_dir)
    record = second.manifest["passes"][0]
    assert record["cached"] is False and "corrupt" in caplog.text
    assert record["metrics"]["perplexity"]["value"] == first.manifest["passes"][0]["metrics"]["perplexity"]["value"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_a_tampered_source_conversion_is_rebuilt(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    optforge.build(make_recipe(tiny_model_dir, tmp_path / "a"), cache_dir=cache_dir)
    (source_entry,) = [p for p in (cache_dir / "sources").iterdir() if p.is_dir()]
    _poison_keeping_mtime(source_entry / "model.safetensors")
    out = optforge.build(make_recipe(tiny_model_dir, tmp_path / "b"), cache_dir=cache_dir)
    assert torch.isfinite(torch.tensor(out.manifest["source"]["metrics"]["perplexity"]["value"]))


def test_editing_the_source_config_or_tokenizer_converts_again(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    source = tmp_path / "src"
    subprocess.run(["cp", "-rp", str(tiny_model_dir), str(source)], check=True)
    optforge.build(make_recipe(source, tmp_path / "a"), cache_dir=cache_dir)
    config = json.loads((source / "config.json").read_text())
    config["rms_norm_eps"] = 0.5  # changes the model's outputs without touching the weights
    (source / "config.json").write_text(json.dumps(config))
    out = optforge.build(make_recipe(source, tmp_path / "b"), cache_dir=cache_dir)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["rms_norm_eps"] == 0.5
    assert out.manifest["source"]["files_sha256"]["config.json"] != ""
    assert len([p for p in (cache_dir / "sources").iterdir() if p.is_dir()]) == 2


def test_a_corrupt_eval_result_is_recomputed(tmp_path, caplog):
    cache = Cache(tmp_path)
    cache.put_json("evals", "k", {"value": 1.5})
    assert cache.get_json("evals", "k") == {"value": 1.5}
    path = tmp_path / "evals" / "k.json"
    path.write_text(path.read_text().replace("1.5", "9.5"))
    assert cache.get_json("evals", "k") is None and not path.exists() and "corrupt" in caplog.text


def _build_entry(args) -> str:
    root, delay = args
    cache = Cache(root)

    def build(tmp):
        time.sleep(delay)
        (tmp / "data.bin").write_bytes(b"x" * 1000)

    entry, _ = cache.get_or_build_dir("passes", "same-key", build)
    return (entry.path / "data.bin").read_bytes().decode()[:1]


def test_concurrent_writers_of_one_key_all_succeed(tmp_path):
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map(_build_entry, [(tmp_path, 0.01 * (i % 3)) for i in range(24)])
    assert results == ["x"] * 24
    assert sorted(p.name for p in (tmp_path / "passes").iterdir()) == ["same-key", "same-key.entry.json"]


def test_a_build_killed_inside_a_pass_leaves_nothing_trusted(tmp_path):
    code = (
        "import os, signal, sys\n"
        "from optforge.cache import Cache\n"
        "def build(tmp):\n"
        "    (tmp / 'half.bin').write_bytes(b'h')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "Cache(sys.argv[1]).get_or_build_dir('passes', 'k', build)\n"
    )
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)]).returncode == -9
    assert [p.name for p in (tmp_path / "passes").iterdir()][0].startswith(".k.tmp-")
    cache = Cache(tmp_path)  # the next run removes the dead writer's staging folder
    assert cache.dir_entry("passes", "k") is None and list((tmp_path / "passes").iterdir()) == []


def test_cache_verify_and_prune_commands(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    first = optforge.build(make_recipe(tiny_model_dir, tmp_path / "a"), cache_dir=cache_dir)
    assert runner.invoke(app, ["cache", "verify", "--cache-dir", str(cache_dir)]).exit_code == 0
    entry = cache_dir / "passes" / first.manifest["passes"][0]["cache_key"]
    (entry / "config.json").write_text("{}")
    result = runner.invoke(app, ["cache", "verify", "--cache-dir", str(cache_dir)])
    assert result.exit_code == 1 and "1 corrupt" in result.output
    assert runner.invoke(app, ["cache", "verify", "--discard", "--cache-dir", str(cache_dir)]).exit_code == 1
    assert not entry.exists() and runner.invoke(app, ["cache", "verify", "--cache-dir", str(cache_dir)]).exit_code == 0
    result = runner.invoke(app, ["cache", "prune", "--older-than", "0", "--cache-dir", str(cache_dir)])
    assert result.exit_code == 0 and Cache(cache_dir).dir_keys("sources") == []
    assert runner.invoke(app, ["cache", "clear", "--yes", "--cache-dir", str(cache_dir)]).exit_code == 0
    assert list(cache_dir.iterdir()) == []


@pytest.mark.parametrize("n", [200])
def test_many_promotions_of_one_key_race_safely(tmp_path, n):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_build_entry, [(tmp_path, 0.0)] * n)
    assert results.count("x") == n


def test_a_pass_resume_folder_goes_once_its_entry_is_cached(tmp_path):
    cache = Cache(tmp_path)
    folder = cache.resume_dir("k")
    assert folder == tmp_path / "resume" / "k"

    def build(tmp):
        folder.mkdir(parents=True)
        (folder / "layer-00000.safetensors").write_bytes(b"x")
        (tmp / "model.bin").write_bytes(b"m")

    cache.get_or_build_dir("passes", "k", build)
    assert not folder.exists()
    folder.mkdir(parents=True)  # left by a build killed while another one finished the entry
    assert cache.get_or_build_dir("passes", "k", build)[1] is True and not folder.exists()


def test_prune_removes_old_resume_folders_but_not_fresh_or_held_ones(tmp_path):
    cache = Cache(tmp_path)
    for key in ("old", "fresh", "held"):
        cache.resume_dir(key).mkdir(parents=True)
        (cache.resume_dir(key) / "index.json").write_text("{}")
    week_ago = time.time() - 7 * 86400
    for key in ("old", "held"):
        for path in (cache.resume_dir(key), cache.resume_dir(key) / "index.json"):
            os.utime(path, (week_ago, week_ago))
    with cache._lock("passes", "held"):  # a build of that key is running
        result = runner.invoke(app, ["cache", "prune", "--older-than", "3", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == ["fresh", "held"]
    assert runner.invoke(app, ["cache", "clear", "--yes", "--cache-dir", str(tmp_path)]).exit_code == 0
    assert list(tmp_path.iterdir()) == []
