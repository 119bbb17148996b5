"""FP8 E4M3: the rounding equals the real cast, and Fp8Linear rounds weights and activations through it."""

import torch

from optforge.formats.fp8 import Fp8Linear, round_to_e4m3


def test_fp8_linear_static_and_dynamic_round_through_e4m3():
    gen = torch.Generator().manual_seed(2)
    w, x = torch.randn(32, 64, generator=gen), torch.randn(7, 64, generator=gen)
    ref = x @ w.T
    for spec in ({"strategy": "channel", "dynamic": True}, {"strategy": "tensor", "dynamic": False}):
        layer = Fp8Linear(64, 32, False, spec)
        layer.set_float(w, input_amax=float(x.abs().max()))
        assert layer.weight.dtype == torch.float8_e4m3fn
        assert layer.weight_scale.shape == ((32, 1) if spec["strategy"] == "channel" else (1,))
        y = layer(x)
        err = (y - ref).abs().max() / ref.abs().max()
        assert 1e-4 < err < 0.08, (spec, float(err))  # E4M3 has 3 mantissa bits: a few % error, never exact
    # A static scale clips activations beyond the calibrated max instead of overflowing to NaN.
    assert torch.isfinite(layer(x * 100)).all()


def test_float_e4m3_rounding_equals_the_fp8_cast():
    gen = torch.Generator().manual_seed(3)
    v = torch.cat([torch.randn(20000, generator=gen) * s for s in (300.0, 1.0, 1e-2, 1e-3)] + [torch.tensor([448.0, 500.0, -1e4, 0.0, 2.0**-9, 3 * 2.0**-10])])
    torch.testing.assert_close(round_to_e4m3(v), v.clamp(-448, 448).to(torch.float8_e4m3fn).float(), rtol=0, atol=0)
