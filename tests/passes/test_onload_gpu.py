"""Onloaded calibration on a GPU: a model on the host calibrated one layer at a time on CUDA gives the same
results as the whole model on the GPU, holds about one layer on the device, and moves activations to the host
when --max-device-memory leaves no room for them."""

from __future__ import annotations

import gc
import logging
import re

import pytest
import torch

from optforge.passes.calibration import calibrate
from optforge.passes.onload import Placement, module_bytes
from optforge.resources import MemoryBudget

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BATCHES = [torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(6)]


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def _gptq(model):
    from optforge.formats.grid import Grid
    from optforge.passes.quant.gptq import GPTQConfig, GPTQLayers
    from optforge.passes.targets import select_linears

    targets = select_linears(model, (r".*",), (r"lm_head",))
    return GPTQLayers(dict.fromkeys(targets, Grid(4, 128, True)), GPTQConfig()), targets


def _peak_of(fn) -> int:
    """Peak bytes torch allocated on the GPU while `fn` ran, above what was allocated before it."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    return torch.cuda.max_memory_allocated() - base


def test_onloaded_gptq_equals_the_model_on_the_gpu_and_holds_about_one_layer():
    results = {}

    def whole():
        model = _model().cuda()
        algorithm, targets = _gptq(model)
        calibrate(model, [b.cuda() for b in BATCHES], algorithm, pass_name="quant.gptq", targets=targets)
        results["gpu"] = {n: tuple(t.cpu() for t in r if t is not None) for n, r in algorithm.results.items()}

    host = _model()
    layers_bytes = sum(module_bytes(m) for m in host.model.layers)

    def onloaded():
        algorithm, targets = _gptq(host)
        calibrate(host, BATCHES, algorithm, pass_name="quant.gptq", targets=targets, placement=Placement.of("cuda"))
        results["onload"] = algorithm.results

    whole_peak, onload_peak = _peak_of(whole), _peak_of(onloaded)
    assert all(p.device.type == "cpu" for p in host.parameters())  # every layer went back home
    for name, (q, s) in results["gpu"].items():
        got = results["onload"][name]
        assert got[0].device.type == "cpu" and torch.equal(got[0], q) and torch.equal(got[1], s), name
    # the same work (solver buffers, library workspaces) on both sides; onloading leaves out at least half the layers
    assert onload_peak < whole_peak - layers_bytes / 2, (onload_peak, whole_peak, layers_bytes)


def test_a_tight_device_budget_keeps_activations_on_the_host_with_the_same_results(caplog):
    free = _model()
    algorithm, targets = _gptq(free)
    calibrate(free, BATCHES, algorithm, pass_name="quant.gptq", targets=targets, placement=Placement.of("cuda"))
    want = algorithm.results

    bounded = _model()
    algorithm, targets = _gptq(bounded)
    layer = module_bytes(bounded.model.layers[0])
    working = max(algorithm.working_bytes(m, 64) for m in bounded.model.layers)
    batch = 64 * 512 * 4
    budget = MemoryBudget(device=2 * layer + working + 2 * batch + batch)  # one layer's work and one more batch
    with caplog.at_level(logging.INFO, logger="optforge.passes.calibration"):
        calibrate(bounded, BATCHES, algorithm, pass_name="quant.gptq", targets=targets, placement=Placement.of("cuda", budget))
    counts = re.search(r"held (\d+) batch\(es\) on the device, (\d+) on the host", caplog.text)
    assert counts and int(counts.group(2)) > 0, caplog.text
    for name, (q, s, _) in want.items():
        assert torch.equal(algorithm.results[name][0], q) and torch.equal(algorithm.results[name][1], s), name
