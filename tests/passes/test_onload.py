"""Calibration under memory budgets: activations over the host budget spill to disk and come back with the same
results, budgets too small for one layer stop with exit 2 and the size that would do, and builds record the
peak memory of every pass (kept with the cached output, so a cached build reports the run that made it)."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from optforge.errors import UserInputError
from optforge.passes.calibration import calibrate
from optforge.passes.onload import Activations, Placement, Tiers, activation_tiers
from optforge.resources import MemoryBudget, parse_bytes

BATCHES = [torch.arange(3 + i, 35 + i).view(1, 32) for i in range(6)]


def _gptq(model):
    from optforge.formats.grid import Grid
    from optforge.passes.quant.gptq import GPTQConfig, GPTQLayers
    from optforge.passes.targets import select_linears

    targets = select_linears(model, (r".*",), (r"lm_head",))
    return GPTQLayers(dict.fromkeys(targets, Grid(4, 32, True)), GPTQConfig(bits=4, group_size=32)), targets


def _model(tiny_model_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_activations_go_device_then_host_then_disk_and_read_back_equal(tmp_path):
    t = torch.randn(2, 5, 8)  # 320 bytes
    tiers = Tiers(torch.device("cpu"), device_free=400, host_free=400, spill_dir=tmp_path / "spill")
    store = Activations(tiers)
    for i in range(3):
        store.append(t + i)
    assert [tier for tier, _, _ in store.items] == ["device", "host", "disk"]
    assert len(list((tmp_path / "spill").iterdir())) == 1
    assert all(torch.equal(got, t + i) for i, got in enumerate(store))
    store.release()
    assert tiers.free == {"device": 400, "host": 400} and not list((tmp_path / "spill").iterdir())


def test_no_spill_folder_and_no_room_is_exit_2():
    tiers = Tiers(torch.device("cpu"), device_free=0, host_free=0, spill_dir=None)
    with pytest.raises(UserInputError, match="--max-host-memory"):
        Activations(tiers).append(torch.zeros(4))


def test_spilled_calibration_equals_the_unbounded_one(tiny_model_dir, tmp_path, caplog, monkeypatch):
    free = _model(tiny_model_dir)
    algorithm, targets = _gptq(free)
    calibrate(free, BATCHES, algorithm, pass_name="quant.gptq", targets=targets)
    want = algorithm.results

    bounded = _model(tiny_model_dir)
    algorithm, targets = _gptq(bounded)
    # the process "holds" 1 GiB; the budget leaves room for one layer's work and two more batches of activations,
    # so of a layer's inputs and outputs (12 batches in all) ten go to disk
    monkeypatch.setattr("optforge.passes.onload.anonymous_bytes", lambda: 1 << 30)
    batch = bounded.config.hidden_size * 32 * 4
    working = max(algorithm.working_bytes(layer, 32) for layer in bounded.model.layers)
    budget = MemoryBudget(host=(1 << 30) + working + 2 * batch + 2 * batch)
    placement = Placement.of("cpu", budget, tmp_path / "spill")
    with caplog.at_level(logging.INFO, logger="optforge.passes.calibration"):
        calibrate(bounded, BATCHES, algorithm, pass_name="quant.gptq", targets=targets, placement=placement)
    spilled = re.search(r"(\d+) on the host, (\d+) spilled to disk", caplog.text)
    assert spilled and int(spilled.group(2)) > 0, caplog.text
    assert not (tmp_path / "spill").exists()  # removed when calibration ends
    assert want.keys() == algorithm.results.keys()
    for name, (q, s, z) in want.items():
        q2, s2, z2 = algorithm.results[name]
        assert torch.equal(q, q2) and torch.equal(s, s2) and z is None and z2 is None


def test_device_budget_below_one_layer_names_the_budget_that_works(tiny_model_dir):
    model = _model(tiny_model_dir)
    algorithm, _ = _gptq(model)
    layers = model.model.layers
    working = max(algorithm.working_bytes(layer, 32) for layer in layers)
    small = Placement.of("cuda", MemoryBudget(device=4096))  # nothing touches a GPU before the check
    with pytest.raises(UserInputError, match=r"--max-device-memory 4 KiB|cannot hold one decoder layer") as err:
        activation_tiers(small, layers, BATCHES, model.config.hidden_size, torch.float32, working, "quant.gptq")
    suggested = str(err.value).rsplit("set --max-device-memory ", 1)[1].split()[0]
    assert err.value.exit_code == 2
    tiers = activation_tiers(Placement.of("cuda", MemoryBudget(device=parse_bytes(suggested))), layers, BATCHES, model.config.hidden_size, torch.float32, working, "quant.gptq")
    assert tiers.free["device"] is not None and tiers.free["device"] >= 0


def test_host_budget_below_what_the_process_holds_is_exit_2(tiny_model_dir):
    model = _model(tiny_model_dir)
    algorithm, targets = _gptq(model)
    with pytest.raises(UserInputError, match=r"--max-host-memory .* set --max-host-memory \d+GiB or more"):
        calibrate(model, BATCHES, algorithm, pass_name="quant.gptq", targets=targets, placement=Placement.of("cpu", MemoryBudget(host=1 << 20)))


def test_build_records_peak_memory_and_a_cached_build_reports_the_run_that_made_it(tiny_model_dir, tmp_path, make_recipe):
    import optforge

    recipe = make_recipe(tiny_model_dir, tmp_path / "out", gate_pct=None, passes=[{"name": "quant.gptq", "config": {"group_size": 32}}])
    first = optforge.build(recipe, cache_dir=tmp_path / "cache")
    memory = first.manifest["passes"][0]["memory"]
    assert memory["host_peak_bytes"] > 50 << 20 and "device_peak_bytes" not in memory  # a CPU build: host only
    again = optforge.build(recipe, cache_dir=tmp_path / "cache")
    assert again.manifest["passes"][0]["cached"] and again.manifest["passes"][0]["memory"] == memory


def test_device_budget_on_a_cpu_build_is_exit_2(tiny_model_dir, tmp_path, make_recipe):
    import optforge

    with pytest.raises(UserInputError, match="--device cuda"):
        optforge.build(make_recipe(tiny_model_dir, tmp_path / "out"), cache_dir=tmp_path / "cache", memory=MemoryBudget(device=1 << 30))
