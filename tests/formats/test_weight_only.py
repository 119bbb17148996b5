"""WeightOnlyLinear (INT4/INT8 grids): the kernels agree with the dequantized reference and the buffers are the
compressed-tensors tensors."""

import pytest
import torch

from optforge.formats.grid import Grid, qparams, quantize
from optforge.formats.weight_only import WeightOnlyLinear


def make_layer(bits, group, symmetric, n=64, k=256, bias=True):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    grid = Grid(bits, group, symmetric)
    scale, zero = qparams(w, grid)
    layer = WeightOnlyLinear(k, n, bias, {"bits": bits, "group_size": group, "symmetric": symmetric})
    layer.set_quantized(quantize(w, scale, zero, grid), scale, zero)
    if bias:
        layer.bias.data = torch.randn(n)
    return layer


@pytest.mark.parametrize("bits,group,symmetric,kernel", [
    (4, 64, True, "int4pack_mm"),
    (4, 128, False, "int4pack_mm"),
    (4, None, True, "dequantize+matmul"),  # the int4 kernel needs groups of 32-256
    (8, None, True, "int8 cast+matmul"),
    (8, 32, False, "dequantize+matmul"),
])
def test_kernel_matches_dequantized_reference(bits, group, symmetric, kernel):
    layer = make_layer(bits, group, symmetric)
    x = torch.randn(3, 5, 256)
    ref = x @ layer.dequantized().T + layer.bias
    y = layer(x)
    assert layer.kernel == kernel
    assert y.shape == (3, 5, 64)
    # int4pack runs bf16 activations and scales: ~3 significant digits
    tol = 2e-2 * ref.abs().max() if kernel == "int4pack_mm" else 1e-4 * ref.abs().max()
    assert (y - ref).abs().max() <= tol


def test_state_dict_holds_compressed_tensors_names_and_shapes():
    sd = make_layer(4, 64, False).state_dict()
    assert sd["weight_packed"].shape == (64, 32) and sd["weight_packed"].dtype == torch.int32
    assert sd["weight_scale"].shape == (64, 4)
    assert sd["weight_zero_point"].shape == (8, 4) and sd["weight_zero_point"].dtype == torch.int32
    assert sd["weight_shape"].tolist() == [64, 256]
    assert set(make_layer(8, None, True, bias=False).state_dict()) == {"weight", "weight_scale"}


def test_reloaded_layer_runs_the_same():
    layer = make_layer(4, 32, True)
    fresh = WeightOnlyLinear(256, 64, True, {"bits": 4, "group_size": 32, "symmetric": True})
    fresh.load_state_dict(layer.state_dict(), assign=True)
    x = torch.randn(2, 256)
    assert torch.equal(fresh(x), layer(x))
