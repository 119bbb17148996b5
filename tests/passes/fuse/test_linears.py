"""fuse.linears: recorded in optforge.json, re-applied by the loader, same greedy tokens, standard weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from optforge.errors import ArtifactError, PassError
from optforge.formats.fused import FusedSlice
from optforge.model_io import load_model
from optforge.pipeline import build


def _recipe(model_dir, out, passes):
    return {"model": {"source": str(model_dir), "dtype": "float32"}, "data": {"calibration": None, "eval": {"perplexity": None}},
            "passes": passes, "output": str(out)}


@pytest.fixture(scope="module")
def fused(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuse-linears")
    result = build(_recipe(tiny_model_dir, tmp / "out", [{"name": "fuse.linears"}]), cache_dir=tmp / "cache")
    return {"output": result.output, "manifest": result.manifest, "cache": tmp / "cache", "tmp": tmp}


def test_fusion_is_recorded_and_weights_stay_standard(fused, tiny_model_dir):
    layout = json.loads((fused["output"] / "optforge.json").read_text())
    assert "fused_linears" in layout["properties"]
    [fusion] = layout["fusions"]
    assert fusion["kind"] == "sibling_linears"
    assert fusion["counts"] == {"q_proj+k_proj+v_proj": 2, "gate_proj+up_proj": 2}
    with safe_open(fused["output"] / "model.safetensors", "pt") as out, safe_open(tiny_model_dir / "model.safetensors", "pt") as src:
        assert set(out.keys()) == set(src.keys())  # any Hugging Face consumer still loads it


def test_loader_reapplies_the_fusion_with_identical_greedy_tokens(fused, tiny_model_dir):
    ref_model, _ = load_model(tiny_model_dir)
    model, _ = load_model(fused["output"])
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, FusedSlice) and isinstance(attn.v_proj, FusedSlice)
    assert isinstance(model.model.layers[1].mlp.up_proj, FusedSlice)
    assert not isinstance(ref_model.model.layers[0].self_attn.q_proj, FusedSlice)
    prompt = torch.tensor([[5, 6, 7, 8, 9], [20, 21, 22, 23, 24]])
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, **kwargs), ref_model.generate(prompt, **kwargs))


def test_rebuild_is_a_cache_hit(fused, tiny_model_dir):
    again = build(_recipe(tiny_model_dir, fused["tmp"] / "again", [{"name": "fuse.linears"}]), cache_dir=fused["cache"])
    assert again.manifest["passes"][0]["cached"] is True


def test_groups_that_match_nothing_fail(tiny_model_dir, tmp_path):
    passes = [{"name": "fuse.linears", "config": {"groups": [["w1", "w3"]]}}]
    with pytest.raises(PassError, match="nothing to fuse"):
        build(_recipe(tiny_model_dir, tmp_path / "out", passes), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists()


def test_unknown_fusion_kind_is_an_artifact_error(fused, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(fused["output"], copy)
    layout = json.loads((copy / "optforge.json").read_text())
    layout["fusions"] = [{"kind": "residual_rmsnorm"}]
    (copy / "optforge.json").write_text(json.dumps(layout))
    with pytest.raises(ArtifactError, match="unknown module fusion"):
        load_model(copy)
