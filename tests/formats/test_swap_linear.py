"""swap_linear: the scheme registry, the bias carried over, and quantize_in_memory built on it."""

import pytest
import torch

from optforge.formats import SCHEMES, kernels_used, quantize_in_memory, swap_linear
from optforge.formats.int8 import Int8WeightOnlyLinear


def test_swap_linear_keeps_the_int8_scheme_and_reports_kernels():
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    assert isinstance(swap_linear(model, "0", {"scheme": "int8_weight_only"}), Int8WeightOnlyLinear)
    swap_linear(model, "1", {"scheme": "weight_only", "bits": 8, "group_size": None, "symmetric": True})
    assert kernels_used(model) == {"0": None, "1": None}
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        swap_linear(model, "1", {"scheme": "nf3"})


def test_every_scheme_carries_a_copy_of_the_bias():
    for scheme in SCHEMES:
        model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 8, bias=False))
        bias = model[0].bias.detach().clone()
        new = swap_linear(model, "0", {"scheme": scheme})
        assert torch.equal(new.bias, bias) and not new.bias.requires_grad
        assert new.bias.data_ptr() != bias.data_ptr() and model[0] is new
        assert swap_linear(model, "1", {"scheme": scheme}).bias is None


def test_quantize_in_memory_rounds_every_linear_but_the_head():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(32, 16), "lm_head": torch.nn.Linear(16, 8)})
    float_proj = model["proj"]
    assert quantize_in_memory(model, {"scheme": "w8a8_int8"}) == ["proj"]
    assert type(model["lm_head"]) is torch.nn.Linear
    x = torch.randn(4, 32)
    torch.testing.assert_close(model["proj"](x), float_proj(x), rtol=0.05, atol=0.05)
    assert torch.equal(model["proj"].bias, float_proj.bias)
