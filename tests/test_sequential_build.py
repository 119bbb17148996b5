"""`sequential: true` on a build's gates (tiny model): a clearly fine pass is decided before the last look and
its manifest says how many items it used; a clearly broken pass fails early; a later gate against that pass
still compares all items."""

import pytest

import optforge
from optforge.errors import GateFailed


def _recipe(model_dir, out, passes):
    return {
        "name": "tiny-sequential",
        "model": {"source": str(model_dir), "dtype": "float32"},
        "data": {"calibration": {"dataset": "boolq", "rows": [2000, 2004], "max_length": 32},
                 "eval": {"perplexity": None, "tasks": [{"name": "arc_easy", "limit": 400, "batch_size": 32}]}},
        "passes": passes,
        "output": str(out),
    }


def test_a_harmless_pass_is_decided_early_and_records_its_looks(tiny_model_dir, tmp_path, cache_dir):
    gate = {"metric": "arc_easy.acc", "max_drop": 10, "sequential": True}
    passes = [{"name": "quant.int8_weight_only", "gate": gate}, {"name": "quant.kv_cache", "config": {"dtype": "int8"}, "gate": {"metric": "arc_easy.acc", "max_drop": 10}}]
    result = optforge.build(_recipe(tiny_model_dir, tmp_path / "out", passes), cache_dir=cache_dir)
    first, second = result.manifest["passes"]
    assert first["gates"][0]["verdict"] == "pass"
    assert first["looks"]["looks"] < 4 and first["looks"]["items"]["arc_easy"] < 400 == first["looks"]["total_items"]["arc_easy"]
    assert first["gates"][0]["n"] == first["looks"]["items"]["arc_easy"] and first["gates"][0]["confidence"] > 0.95
    assert "looks" not in second and second["gates"][0]["n"] == 400  # measured against all of the previous model's items


def test_a_broken_pass_fails_before_the_last_look(tiny_model_dir, tmp_path, cache_dir):
    gate = {"metric": "perplexity", "max_increase_pct": 5, "sequential": True}
    recipe = _recipe(tiny_model_dir, tmp_path / "out", [{"name": "test.scramble", "config": {"noise": 50.0}, "gate": gate}])
    recipe["data"]["eval"] = {"perplexity": {"rows": [0, 40], "max_length": 48, "batch_size": 8}}
    with pytest.raises(GateFailed) as failed:
        optforge.build(recipe, cache_dir=cache_dir)
    assert failed.value.result["verdict"] == "fail" and failed.value.result["n"] == 25  # the first look: 25 of 40 passages
