"""Output paths: a build never deletes what is not an optforge artifact, and replaces an artifact atomically."""

import os
import stat

import pytest
import yaml
from typer.testing import CliRunner

import optforge
from optforge.artifact import check_output_path, verify_artifact
from optforge.cli import app
from optforge.durable import publish_dir, remove_stale_staging, staging_sibling
from optforge.errors import ArtifactError

runner = CliRunner()


def _recipe_file(tmp_path, data) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_non_empty_folder_is_refused_with_exit_2_and_kept(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    result = runner.invoke(app, ["build", _recipe_file(tmp_path, make_recipe(tiny_model_dir, out)), "--cache-dir", str(cache_dir)])
    assert result.exit_code == 2, result.output
    assert "not an optforge artifact" in result.output and "--force" in result.output
    assert (out / "thesis.tex").read_text() == "years of work"


def test_force_replaces_a_non_artifact_folder(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "old.txt").write_text("x")
    result = runner.invoke(app, ["build", _recipe_file(tmp_path, make_recipe(tiny_model_dir, out)), "--cache-dir", str(cache_dir), "--force"])
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists()
    verify_artifact(out)


@pytest.mark.parametrize("target", ["source", "cwd", "cache", "recipe_dir"])
def test_protected_folders_are_refused_even_with_force(target, tiny_model_dir, tmp_path, cache_dir, make_recipe, monkeypatch):
    cache_dir.mkdir(parents=True)
    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()
    monkeypatch.chdir(tmp_path)
    out = {"source": tiny_model_dir, "cwd": tmp_path, "cache": cache_dir, "recipe_dir": recipe_dir}[target]
    recipe = _recipe_file(recipe_dir, make_recipe(tiny_model_dir, out))
    before = sorted(p.name for p in out.iterdir())
    result = runner.invoke(app, ["build", recipe, "--cache-dir", str(cache_dir), "--force"])
    assert result.exit_code == 2, result.output
    assert sorted(p.name for p in out.iterdir()) == before


def test_output_dot_is_refused(tiny_model_dir, tmp_path, cache_dir, make_recipe, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.md").write_text("keep")
    monkeypatch.chdir(work)
    result = runner.invoke(app, ["build", _recipe_file(tmp_path, make_recipe(tiny_model_dir, tmp_path / "x")), "--output", ".", "--cache-dir", str(cache_dir)])
    assert result.exit_code == 2 and (work / "notes.md").read_text() == "keep"


def test_an_earlier_artifact_is_replaced(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    out = tmp_path / "art"
    optforge.build(make_recipe(tiny_model_dir, out), cache_dir=cache_dir)
    passes = [{"name": "quant.int8_weight_only", "config": {"exclude": ["lm_head", "down_proj"]}}]
    optforge.build(make_recipe(tiny_model_dir, out, passes=passes), cache_dir=cache_dir)
    assert verify_artifact(out)["passes"][0]["config"]["exclude"] == ["lm_head", "down_proj"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".art.")] == []


def test_an_artifact_with_extra_files_is_not_replaced_without_force(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    out = optforge.build(make_recipe(tiny_model_dir, tmp_path / "art"), cache_dir=cache_dir).output
    (out / "my-notes.txt").write_text("added by hand")
    with pytest.raises(ArtifactError, match="my-notes.txt"):
        check_output_path(out)


def test_artifact_files_are_readable_by_other_users(tiny_model_dir, tmp_path, cache_dir, make_recipe):
    old = os.umask(0o022)
    try:
        out = optforge.build(make_recipe(tiny_model_dir, tmp_path / "art"), cache_dir=cache_dir).output
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}


def test_publish_keeps_the_old_tree_until_the_new_one_is_in_place(tmp_path):
    final = tmp_path / "art"
    final.mkdir()
    (final / "a").write_text("old")
    staged = staging_sibling(final)
    (staged / "a").write_text("new")
    publish_dir(staged, final)
    assert (final / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_stale_staging_of_dead_writers_is_removed_and_an_interrupted_swap_restored(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no live process has it
    (tmp_path / f".art.tmp-{dead}-abc").mkdir()
    (tmp_path / f".other.old-{dead}-xyz").mkdir()
    (tmp_path / f".other.old-{dead}-xyz" / "weights").write_text("old artifact")
    live = staging_sibling(tmp_path / "art")  # ours: kept
    remove_stale_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "other"])
    assert (tmp_path / "other" / "weights").read_text() == "old artifact"


def test_publish_flushes_every_file_before_the_rename(tmp_path, monkeypatch):
    import optforge.durable as durable

    events = []
    monkeypatch.setattr(durable, "_fsync", lambda path: events.append(("fsync", path.name)))
    real_rename = os.rename
    monkeypatch.setattr(durable.os, "rename", lambda a, b: (events.append(("rename", b.name)), real_rename(a, b)))
    final = tmp_path / "art"
    staged = staging_sibling(final)
    (staged / "sub").mkdir()
    for name in ("a.bin", "sub/b.bin"):
        (staged / name).write_bytes(b"x")
    publish_dir(staged, final)
    flushed_before = {name for kind, name in events[: events.index(("rename", "art"))] if kind == "fsync"}
    assert {"a.bin", "b.bin", "sub", staged.name} <= flushed_before
    assert events[-1] == ("fsync", tmp_path.name)  # the parent folder, so the new name itself is durable
