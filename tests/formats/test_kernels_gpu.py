"""The CUDA kernels of the quantized Linears agree with their dequantized weights and the CPU reference."""

import pytest
import torch

from optforge.formats.fp8 import Fp8Linear
from optforge.formats.grid import Grid, qparams, quantize
from optforge.formats.int8 import Int8WeightOnlyLinear, W8A8Linear
from optforge.formats.weight_only import WeightOnlyLinear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("bits,group,symmetric,kernel", [
    (4, 128, True, "int4pack_mm"),
    (4, 64, False, "int4pack_mm"),
    (8, None, True, "triton w8_matmul"),
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


def _needs_fp8():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9+")


def test_fp8_scaled_mm_for_large_batches():
    _needs_fp8()
    layer = Fp8Linear(512, 256, False)
    w = torch.randn(256, 512)
    layer.set_float(w)
    layer = layer.cuda()
    x = torch.randn(100, 512, device="cuda", dtype=torch.bfloat16)  # above TRITON_MAX_ROWS
    ref = x.float() @ w.cuda().T
    y = layer(x).float()
    assert layer.kernel == "torch._scaled_mm"
    assert (y - ref).abs().max() <= 0.1 * ref.abs().max()


def _cpu_reference(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The same layer's CPU path (E4M3 / int8 rounding emulated in float32) on the same activations."""
    cpu = layer.cpu()
    with torch.no_grad():
        y = cpu(x.float().cpu())
    layer.cuda()
    return y


@pytest.mark.parametrize("rows", [1, 5, 32, 64])
@pytest.mark.parametrize("scheme", ["int8", "w8a8", "fp8-dynamic", "fp8-static", "fp8-tensor-static"])
def test_triton_w8_kernel_matches_the_cpu_reference(scheme, rows):
    """Decode-sized batches run runtime/kernels/w8_matmul.py; same rounding as the CPU reference.

    Tolerance: the kernel's output is bf16 (3 significant digits), plus a rare one-step flip where
    x / scale lands within float32 rounding of a tie; 1% of the largest output covers both."""
    if scheme.startswith("fp8"):
        _needs_fp8()
    torch.manual_seed(rows)
    n, k = 384, 1024
    w = torch.randn(n, k) * 0.02
    if scheme == "int8":
        layer = Int8WeightOnlyLinear(k, n, True)
        layer.weight = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        layer.weight_scale = torch.rand(n, 1) * 1e-3
    elif scheme == "w8a8":
        layer = W8A8Linear(k, n, True)
        layer.set_float(w)
    else:
        layer = Fp8Linear(k, n, True, {"strategy": "tensor" if "tensor" in scheme else "channel", "dynamic": scheme == "fp8-dynamic"})
        layer.set_float(w, input_amax=3.0)
    layer.bias.data = torch.randn(n) * 0.1
    layer = layer.cuda()
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    y = layer(x).float().cpu()
    assert layer.kernel.startswith("triton w8_matmul")
    ref = _cpu_reference(layer, x)
    err = (y - ref).abs()
    assert err.max() <= 1e-2 * ref.abs().max(), f"max err {err.max():.4g} at {divmod(int(err.argmax()), n)}, ref max {ref.abs().max():.4g}"


def test_triton_e4m3_rounding_matches_torch_cast():
    """The kernel's activation rounding (fp32 -> E4M3, RNE, saturated) is torch's cast, value for value."""
    _needs_fp8()
    from optforge.runtime.kernels.w8_matmul import ACT_FP8_STATIC, w8_matmul

    k = 256
    x = (torch.randn(16, k, device="cuda") * torch.logspace(-4, 3, k, device="cuda")).to(torch.bfloat16)
    eye = torch.eye(k, device="cuda").to(torch.float8_e4m3fn)  # y = rounded x, exactly
    y = w8_matmul(x.float(), eye, torch.ones(k, device="cuda"), act=ACT_FP8_STATIC, input_scale=torch.ones(1, device="cuda"))
    ref = x.float().clamp(-448, 448).to(torch.float8_e4m3fn).float()
    bad = (y != ref).nonzero()
    assert len(bad) == 0, f"{len(bad)} values differ, e.g. x={x.float()[tuple(bad[0])]:.6g}: kernel {y[tuple(bad[0])]:.6g} vs torch {ref[tuple(bad[0])]:.6g}"


def test_triton_w8_kernel_fp32_activations_are_exact_enough():
    layer = Int8WeightOnlyLinear(256, 128, False)
    layer.weight = torch.randint(-127, 128, (128, 256), dtype=torch.int8)
    layer.weight_scale = torch.rand(128, 1) * 1e-2
    x = torch.randn(3, 256)
    ref = layer(x)
    y = layer.cuda()(x.cuda()).cpu()
    assert layer.kernel == "triton w8_matmul"
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
