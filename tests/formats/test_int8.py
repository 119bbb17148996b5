"""The one int8 row rounding and the int8 modules: half-a-step error, zero rows, the layers' references."""

import torch

from optforge.formats.int8 import Int8WeightOnlyLinear, W8A8Linear, quantize_rows_int8


def test_rtn_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(96, 80) * torch.linspace(0.01, 3.0, 96)[:, None]
    q, scale = quantize_rows_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (96, 1) and scale.dtype == torch.float32
    assert q.abs().max() <= 127
    err = (q.float() * scale - w).abs()
    assert torch.all(err <= scale / 2 + 1e-6)
    # The largest-magnitude entry of every row maps to +-127 exactly.
    assert torch.all(q.abs().amax(dim=1) == 127)


def test_zero_rows_get_scale_one_and_zero_values():
    w = torch.zeros(4, 8)
    w[1] = 1.0
    q, scale = quantize_rows_int8(w)
    assert torch.equal(scale[:, 0], torch.tensor([1.0, 1.0 / 127.0, 1.0, 1.0]))
    assert not q[[0, 2, 3]].any() and q[1].tolist() == [127] * 8


def test_weight_only_layer_matches_dequantized_reference():
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 48, bias=True)
    layer = Int8WeightOnlyLinear(64, 48, True)
    layer.set_float(linear.weight)
    layer.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    q, scale = quantize_rows_int8(linear.weight.detach())
    assert torch.equal(layer.weight, q) and torch.equal(layer.weight_scale, scale)
    x = torch.randn(3, 5, 64)  # (B, T, K)
    ref = x @ (q.float() * scale).T + linear.bias
    out = layer(x)
    assert out.shape == (3, 5, 48)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # And close to the float layer: int8 RTN keeps ~2 significant digits.
    assert (out - linear(x)).abs().max() < 0.02


def test_w8a8_zero_tokens_and_zero_weight_rows_give_exact_zeros():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16, 32, generator=gen)
    w[5] = 0.0
    layer = W8A8Linear(32, 16, False)
    layer.set_float(w)
    x = torch.randn(3, 32, generator=gen)
    x[1] = 0.0
    y = layer(x)
    assert layer.kernel == "torch._int_mm"
    assert not y[1].any() and not y[:, 5].any() and torch.isfinite(y).all()


def test_w8a8_large_batch_in_row_blocks_equals_one_gemm(monkeypatch):
    """A batch larger than ROWS_PER_GEMM goes through the GEMM in row blocks: the same values as one GEMM
    over every row (each row's scale is its own), the last block shorter, the bias added once."""
    import optforge.formats.int8 as int8

    torch.manual_seed(0)
    layer = W8A8Linear(64, 24, bias=True)
    layer.set_float(torch.randn(24, 64))
    layer.bias.data = torch.randn(24)
    x = torch.randn(3, 9, 64)  # 27 rows: blocks of 8, 8, 8, 3
    xq, xs = quantize_rows_int8(x.reshape(-1, 64))
    expected = ((torch._int_mm(xq, layer.weight.T).float() * xs * layer.weight_scale.reshape(1, -1)) + layer.bias).reshape(3, 9, 24)
    monkeypatch.setattr(int8, "ROWS_PER_GEMM", 8)
    assert torch.equal(layer(x), expected)
