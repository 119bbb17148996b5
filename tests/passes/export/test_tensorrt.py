"""export.tensorrt without TensorRT: the recipe is refused with exit 2 naming what to install, nothing written."""

from __future__ import annotations

import importlib.util

import pytest
import yaml
from typer.testing import CliRunner

from optforge.errors import MissingDependencyError, UserInputError


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


needs_no_tensorrt = pytest.mark.skipif(_tensorrt_importable(), reason="TensorRT is installed here; these tests cover its absence")


def _recipe(tmp_path, model_dir) -> dict:
    return {
        "name": "tiny-trt",
        "model": {"source": str(model_dir)},
        "data": {"calibration": None, "eval": {"perplexity": None}},
        "passes": [{"name": "export.onnx"}, {"name": "export.tensorrt", "config": {"precision": "fp16"}}],
        "output": str(tmp_path / "engine"),
    }


@needs_no_tensorrt
def test_recipe_validation_fails_before_any_work(tmp_path, tiny_model_dir):
    from optforge.pipeline import build

    with pytest.raises(MissingDependencyError, match="tensorrt") as info:
        build(_recipe(tmp_path, tiny_model_dir), cache_dir=tmp_path / "cache")
    assert isinstance(info.value, UserInputError) and info.value.exit_code == 2
    assert "pip install tensorrt" in str(info.value)
    assert not (tmp_path / "engine").exists()
    assert not (tmp_path / "cache" / "passes").exists()  # no pass ran, not even export.onnx


@needs_no_tensorrt
def test_cli_exits_2_and_writes_nothing(tmp_path, tiny_model_dir):
    from optforge.cli import app

    recipe_path = tmp_path / "trt.yaml"
    recipe_path.write_text(yaml.safe_dump(_recipe(tmp_path, tiny_model_dir)))
    result = CliRunner().invoke(app, ["build", str(recipe_path), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 2, result.output
    assert "tensorrt" in result.output.lower() and "install" in result.output.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trt.yaml"]  # no output dir, no cache entries


@needs_no_tensorrt
def test_pass_is_listed_without_tensorrt():
    from optforge.pass_ import describe_config, registry

    cls = registry()["export.tensorrt"]
    assert {row["name"] for row in describe_config(cls)} >= {"precision", "batch", "sequence", "past", "workspace_mib", "timing_cache"}
    assert "onnx_graph" in cls.requires and "tensorrt_engine" in cls.produces


def test_profile_shapes_cover_every_dynamic_input():
    from optforge.passes.export.tensorrt import TensorRTConfig, profile_shapes

    info = {"num_kv_heads": 2, "head_dim": 16, "inputs": [{"name": n} for n in ("input_ids", "position_ids", "past_key_values.0.key", "past_key_values.0.value")]}
    cfg = object.__new__(TensorRTConfig)  # a bare config: this is pure shape logic
    for name, value in {"batch": (1, 2, 8), "sequence": (1, 128, 512), "past": (0, 128, 1024)}.items():
        object.__setattr__(cfg, name, value)
    shapes = profile_shapes(cfg, info)
    assert shapes["input_ids"] == ((1, 1), (2, 128), (8, 512))
    assert shapes["past_key_values.0.value"] == ((1, 2, 0, 16), (2, 2, 128, 16), (8, 2, 1024, 16))


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not _tensorrt_importable() or importlib.util.find_spec("torch") is None, reason="needs TensorRT (tensorrt-cu12/cu13 with its libs) and a CUDA GPU; not installable on these machines")
def test_engine_builds_and_matches_pytorch(tmp_path, tiny_model_dir):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from optforge.pipeline import build

    recipe = _recipe(tmp_path, tiny_model_dir)
    recipe["passes"][1]["config"]["timing_cache"] = str(tmp_path / "timing.cache")
    result = build(recipe, cache_dir=tmp_path / "cache")
    info = __import__("json").loads((result.output / "optforge.json").read_text())["tensorrt"]
    assert (result.output / "model.plan").stat().st_size > 0 and (tmp_path / "timing.cache").is_file()
    assert info["parity"]["max_abs_logits_diff"] <= info["parity"]["tolerance"]


def test_a_cpu_build_is_refused_naming_the_pass(tmp_path, tiny_model_dir, monkeypatch):
    """TensorRT has no CPU engines: `--device cpu` is refused while the recipe is validated, before any work."""
    from optforge.errors import RecipeError
    from optforge.pass_ import describe_support, registry
    from optforge.pipeline import build

    cls = registry()["export.tensorrt"]
    monkeypatch.setattr(cls, "preflight", lambda self: None)  # as if TensorRT were installed
    with pytest.raises(RecipeError, match=r"passes\[1\]\.name: pass 'export.tensorrt' cannot run with --device cpu: .*CUDA") as info:
        build(_recipe(tmp_path, tiny_model_dir), cache_dir=tmp_path / "cache", device="cpu")
    assert info.value.exit_code == 2
    assert not (tmp_path / "engine").exists() and not (tmp_path / "cache").exists()
    assert "--device cuda" in describe_support(cls)
