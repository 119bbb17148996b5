"""GPTQ's Triton block kernel against the torch loop: same codes, scales and zeros on every kind of grid.

Runs on CUDA, or on the CPU under Triton's interpreter (`TRITON_INTERPRET=1` with Triton installed), where
the two are identical bit for bit; on the GPU the compiler may fuse a multiply-add, so a code may move by one
step where a value sits on a rounding boundary.
"""

from __future__ import annotations

import os

import pytest
import torch

from optforge.formats.grid import Grid, dequantize
from optforge.passes.quant import gptq

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED), reason="needs CUDA, or Triton's interpreter (TRITON_INTERPRET=1)")]

GRIDS = {
    "int4 g16 symmetric": Grid(4, 16, True),
    "int4 g16 asymmetric": Grid(4, 16, False),
    "int4 g32 full range": Grid(4, 32, True, full_range=True),
    "int8 per channel": Grid(8, None, True),
    "int4 per channel asymmetric": Grid(4, None, False),
}


def _problem(rows: int, cols: int, device: str):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, cols, generator=gen) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=gen))  # correlated inputs
    w = torch.randn(rows, cols, generator=gen) * 0.05
    return w.to(device), (2 * x.T @ x / x.shape[0]).to(device)


@pytest.mark.parametrize("act_order", [False, True], ids=["in order", "act order"])
@pytest.mark.parametrize("name", list(GRIDS))
def test_block_kernel_equals_the_torch_loop(name, act_order, monkeypatch):
    gptq_block = pytest.importorskip("optforge.passes.quant.gptq_block", reason="needs Triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w, h = _problem(40, 96, device)  # 96 columns in blocks of 64: the last block is narrower
    h[5, :] = h[:, 5] = 0  # a dead input column
    solve = lambda: gptq.gptq_quantize(w, h, GRIDS[name], act_order=act_order, damp=0.01, block_size=64)  # noqa: E731
    monkeypatch.setattr(gptq, "_block_kernel", lambda W, **kw: None)
    q_ref, s_ref, z_ref = solve()
    fits = []

    def kernel(W, *, static, g, block_size):  # the production rule, on any device
        fits.append(static or block_size % g == 0)
        return gptq_block if fits[-1] else None

    monkeypatch.setattr(gptq, "_block_kernel", kernel)
    q, s, z = solve()
    assert fits == [True]
    if device == "cpu":  # the interpreter: identical
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
        assert (z is None and z_ref is None) or torch.equal(z, z_ref)
    else:  # fused multiply-adds: rare one-step moves, the same reconstruction error
        assert (q != q_ref).float().mean().item() < 0.01
        err = lambda qq, ss, zz: ((dequantize(qq, ss, zz) - w) @ h @ (dequantize(qq, ss, zz) - w).T).trace().item()  # noqa: E731
        assert err(q, s, z) == pytest.approx(err(q_ref, s_ref, z_ref), rel=0.02)


def test_a_kernel_that_does_not_compile_leaves_the_torch_loop_to_finish(monkeypatch, caplog):
    gptq_block = pytest.importorskip("optforge.passes.quant.gptq_block", reason="needs Triton")
    from triton.runtime.errors import OutOfResources

    device = "cuda" if torch.cuda.is_available() else "cpu"
    w, h = _problem(40, 96, device)
    solve = lambda: gptq.gptq_quantize(w, h, GRIDS["int4 g16 symmetric"], act_order=False, damp=0.01, block_size=64)  # noqa: E731
    monkeypatch.setattr(gptq, "_block_kernel", lambda W, **kw: None)
    reference = solve()

    def fails(*args, **kwargs):
        raise OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(gptq, "_block_kernel", lambda W, **kw: gptq_block)
    monkeypatch.setattr(gptq_block, "quantize_block", fails)
    monkeypatch.setattr(gptq, "_KERNEL_FAILED", [])
    with caplog.at_level("WARNING", logger=gptq.__name__):
        result = solve()
    assert all(torch.equal(a, b) for a, b in zip(result[:2], reference[:2]))
    assert "does not compile here" in caplog.text and len(gptq._KERNEL_FAILED) == 1
