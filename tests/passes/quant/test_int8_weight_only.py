"""INT8 weight-only RTN: numerics against a float reference, storage really int8, cache key semantics."""

import dataclasses

import torch

from optforge.passes.quant.int8_weight_only import Int8WeightOnly, Int8WeightOnlyConfig, quantize_per_channel_int8
from optforge.runtime.layers import Int8WeightOnlyLinear


def test_rtn_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(96, 80) * torch.linspace(0.01, 3.0, 96)[:, None]
    q, scale = quantize_per_channel_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (96, 1)
    assert q.abs().max() <= 127
    err = (q.float() * scale - w).abs()
    assert torch.all(err <= scale / 2 + 1e-6)
    # The largest-magnitude entry of every row maps to +-127 exactly.
    assert torch.all(q.abs().amax(dim=1) == 127)


def test_zero_rows_get_finite_scales():
    w = torch.zeros(4, 8)
    w[1] = 1.0
    q, scale = quantize_per_channel_int8(w)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(q[0], torch.zeros(8, dtype=torch.int8))


def test_layer_matches_dequantized_reference():
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 48, bias=True)
    q, scale = quantize_per_channel_int8(linear.weight)
    layer = Int8WeightOnlyLinear(64, 48, True)
    layer.weight, layer.weight_scale = q, scale
    layer.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    x = torch.randn(3, 5, 64)  # (B, T, K)
    ref = x @ (q.float() * scale).T + linear.bias
    out = layer(x)
    assert out.shape == (3, 5, 48)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # And close to the float layer: int8 RTN keeps ~2 significant digits.
    assert (out - linear(x)).abs().max() < 0.02


def test_cache_key_depends_on_version_config_input_not_calibration():
    p = Int8WeightOnly(Int8WeightOnlyConfig())
    key = p.cache_key("digest-a", {"rows": [0, 1]})
    assert key == p.cache_key("digest-a", {"rows": [5, 9]})  # int8 RTN reads no calibration data
    assert key != p.cache_key("digest-b", None)
    other = Int8WeightOnly(dataclasses.replace(p.config, exclude=("down_proj",)))
    assert key != other.cache_key("digest-a", None)

    class Bumped(Int8WeightOnly):
        version = Int8WeightOnly.version + 1

    assert key != Bumped(p.config).cache_key("digest-a", None)
