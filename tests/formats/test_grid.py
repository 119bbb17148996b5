"""The integer grid shared by RTN, GPTQ and AWQ."""

import pytest
import torch

from optforge.formats.grid import Grid, dequantize, fake_quantize, qparams, quantize


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, 128, False), (8, None, True), (8, 64, False)])
def test_round_trip_error_is_within_half_a_step(bits, group, symmetric):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    grid = Grid(bits, group, symmetric)
    scale, zero = qparams(w, grid)
    q = quantize(w, scale, zero, grid)
    assert q.dtype == torch.int8 and int(q.min()) >= grid.qmin and int(q.max()) <= grid.qmax
    assert scale.shape == (48, grid.num_groups(256))
    err = (dequantize(q, scale, zero) - w).abs()
    step = scale.repeat_interleave(256 // scale.shape[1], dim=1)
    assert torch.all(err <= step / 2 + 1e-6)


def test_asymmetric_keeps_zero_exact_and_zero_rows_get_unit_scale():
    w = torch.rand(8, 64) + 0.5  # all positive: the range is stretched to include 0
    w[3] = 0
    w[5, :32] = 0
    grid = Grid(4, 32, False)
    scale, zero = qparams(w, grid)
    assert torch.all(torch.isfinite(scale)) and torch.all(scale > 0)
    assert torch.equal(fake_quantize(w, grid)[3], torch.zeros(64))
    assert torch.equal(fake_quantize(w, grid)[5, :32], torch.zeros(32))


def test_group_size_is_halved_until_it_divides_the_width():
    assert Grid(4, 128, True).for_width(576).group_size == 64  # SmolLM2's hidden size
    assert Grid(4, 128, True).for_width(1536).group_size == 128
    assert Grid(8, None, True).for_width(576).group_size is None


def test_int4_group_quantization_beats_per_channel_on_outliers():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    w[:, 7] *= 20  # an outlier column stretches per-channel scales
    per_channel = (fake_quantize(w, Grid(4, None, True)) - w).pow(2).mean()
    grouped = (fake_quantize(w, Grid(4, 64, True)) - w).pow(2).mean()
    assert grouped < 0.5 * per_channel


def test_a_full_range_grid_uses_every_code_and_rounds_finer():
    from optforge.formats.grid import Grid, dequantize, fake_quantize, qparams, quantize

    torch.manual_seed(0)
    w = torch.randn(256, 128)
    plain, full = Grid(4, 32, True), Grid(4, 32, True, full_range=True)
    scale, _ = qparams(w, full)
    q = quantize(w, scale, None, full)
    assert int(q.min()) == -8 and int(q.max()) == 7  # the most negative weights of some groups land on -8
    assert torch.allclose(scale, w.reshape(256, 4, 32).abs().amax(-1) / 7.5)
    assert torch.equal(dequantize(q, scale, None), q.float() * scale.repeat_interleave(32, 1))  # the same format
    assert int(quantize(w, *qparams(w, plain), plain).min()) == -7
    err = lambda g: float((fake_quantize(w, g) - w).pow(2).mean())  # noqa: E731
    assert err(full) < 0.98 * err(plain)  # steps 7/7.5 as wide; the clipped positive maximum gives some of it back
    assert full.for_width(96).full_range and full.for_width(96).group_size == 32
