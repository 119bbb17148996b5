"""The CUDA kernels of the quantized Linears agree with their dequantized weights."""

import pytest
import torch

from optforge.passes.quant.grid import Grid, qparams, quantize
from optforge.runtime.layers import Fp8Linear, WeightOnlyLinear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("bits,group,symmetric,kernel", [
    (4, 128, True, "int4pack_mm"),
    (4, 64, False, "int4pack_mm"),
    (8, None, True, "aten._weight_int8pack_mm"),
])
def test_weight_only_cuda_kernels(bits, group, symmetric, kernel):
    w = torch.randn(256, 512) * 0.02
    grid = Grid(bits, group, symmetric)
    s, z = qparams(w, grid)
    layer = WeightOnlyLinear(512, 256, False, {"bits": bits, "group_size": group, "symmetric": symmetric})
    layer.set_quantized(quantize(w, s, z, grid), s, z)
    layer = layer.cuda()
    x = torch.randn(7, 512, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ layer.dequantized().cuda().T
    y = layer(x).float()
    assert layer.kernel == kernel
    assert (y - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_fp8_scaled_mm():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmul needs compute capability 8.9+")
    layer = Fp8Linear(512, 256, False)
    w = torch.randn(256, 512)
    layer.set_float(w)
    layer = layer.cuda()
    x = torch.randn(5, 512, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ w.cuda().T
    y = layer(x).float()
    assert layer.kernel == "torch._scaled_mm"
    assert (y - ref).abs().max() <= 0.1 * ref.abs().max()
