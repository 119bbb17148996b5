"""A calibrated pass hands each decoder layer back in its output form: its target Linears already swapped for
quantized modules when the layer leaves the compute device, and the float Linears' storage freed (a module the
pass still names must not keep its weights alive: on an onloaded build they would stay on the GPU)."""

import pytest
import torch

PASSES = [
    {"name": "quant.gptq", "config": {"bits": 4, "group_size": 32}},
    {"name": "quant.awq", "config": {"bits": 4, "group_size": 32}},
    {"name": "quant.fp8", "config": {"dynamic": False}},
    {"name": "quant.smoothquant", "config": {}},
]


@pytest.mark.parametrize("step", PASSES, ids=lambda s: s["name"])
def test_each_layer_goes_home_quantized(tiny_model_dir, make_recipe, tmp_path, monkeypatch, step):
    from optforge.formats import SCHEMES
    from optforge.passes.onload import LayerMover

    released = []
    release = LayerMover.release

    def spy(self, index):
        layer = self.layers[index]
        released.append({n: type(m) for n, m in layer.named_modules() if n.startswith(("self_attn.", "mlp.")) and n.count(".") == 1})
        release(self, index)

    monkeypatch.setattr(LayerMover, "release", spy)
    from optforge.passes import targets as targets_module

    selected = []
    pass_targets = targets_module.pass_targets

    def capture(*args, **kwargs):
        found = pass_targets(*args, **kwargs)
        selected.append(dict(found))  # a copy: a pass may pop from its dict as it swaps
        return found

    monkeypatch.setattr(targets_module, "pass_targets", capture)
    import optforge

    optforge.build(make_recipe(tiny_model_dir, tmp_path / "out", gate_pct=None, passes=[step]), cache_dir=tmp_path / "cache")  # a cache of its own: the pass runs
    assert len(selected) == 1 and len(selected[0]) == 14
    assert all(linear.weight.is_meta for linear in selected[0].values())
    quantized = tuple(SCHEMES.values())
    assert released, "calibrate never released a layer"
    for modules in released:
        linears = {n: cls for n, cls in modules.items() if n.rsplit(".", 1)[-1].endswith("_proj")}
        assert len(linears) == 7 and all(issubclass(cls, quantized) for cls in linears.values()), linears


def test_a_swapped_linear_holds_no_storage():
    from dataclasses import asdict

    from optforge.formats.grid import Grid
    from optforge.passes.quant.weight_only import Swapper

    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    targets = {"0": model[0]}
    swap = Swapper(model, targets, {"0": Grid(4, 32, True)}, lambda g: {"scheme": "weight_only", "method": "rtn", **asdict(g)}, "cpu")
    swap.layer(["0"])
    assert targets["0"].weight.is_meta and type(model[0]).__name__ == "WeightOnlyLinear"
    assert swap.modules["0"]["bits"] == 4
