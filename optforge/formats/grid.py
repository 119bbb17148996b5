"""The integer grids of weight-only quantization: scales, zero points, quantize and dequantize.

Conventions match the compressed-tensors checkpoints we write: q is a signed integer in
[-2^(b-1), 2^(b-1) - 1], w ~ (q - zero) * scale with one (scale, zero) per output row and group of
`group_size` input columns (zero is absent when symmetric). A symmetric grid scales by max|w| / qmax and so never
uses -2^(b-1); with `full_range` it scales by max|w| / (qmax + 0.5), using every code ([-8, 7] at max|w| / 7.5 for
INT4, as llama.cpp's Q4_0 does): finer steps, the largest positive weight clipped by half a step. Readers see
the same format (q and scale) either way. Asymmetric ranges always contain 0, so a zero
weight stays exactly zero. Every function takes (out, in) float weights and is shared by RTN, GPTQ and AWQ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    bits: int  # 4 or 8
    group_size: int | None  # input columns per scale; None is one scale per output channel
    symmetric: bool
    full_range: bool = False  # symmetric only: scale by max|w| / (qmax + 0.5), so qmin is used

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def for_width(self, in_features: int) -> "Grid":
        """This grid with the group size made to divide `in_features` (halved until it does).

        Standard formats need equal groups; SmolLM2's hidden size 576 = 4.5 x 128, so a group-128 recipe
        quantizes its 576-wide layers at group 64. The layout records the group each Linear really got.
        """
        g = self.group_size
        if g is None or in_features % g == 0:
            return self
        while g > 1 and in_features % g:
            g //= 2
        return Grid(self.bits, g if g > 1 else None, self.symmetric, self.full_range)

    def num_groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size


def qparams(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (out, G) float32 and zero points (out, G) int8 (None if symmetric) for w (out, in)."""
    w = w.detach().float()
    groups = w.reshape(w.shape[0], grid.num_groups(w.shape[1]), -1)  # (out, G, g)
    if grid.symmetric:
        amax = groups.abs().amax(dim=-1)
        scale = amax / (grid.qmax + 0.5 if grid.full_range else grid.qmax)
        return torch.where(amax > 0, scale, torch.ones_like(scale)), None
    lo = groups.amin(dim=-1).clamp(max=0)
    hi = groups.amax(dim=-1).clamp(min=0)
    span = hi - lo
    scale = torch.where(span > 0, span / (grid.qmax - grid.qmin), torch.ones_like(span))
    zero = torch.clamp(torch.round(grid.qmin - lo / scale), grid.qmin, grid.qmax).to(torch.int8)
    return scale, zero


def _expand(t: torch.Tensor, in_features: int) -> torch.Tensor:
    """(out, G) -> (out, in) by repeating each group's value over its columns."""
    return t.repeat_interleave(in_features // t.shape[1], dim=1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, grid: Grid) -> torch.Tensor:
    """w (out, in) float -> q (out, in) int8 on the grid."""
    s = _expand(scale, w.shape[1])
    q = torch.round(w.detach().float() / s)
    if zero is not None:
        q = q + _expand(zero, w.shape[1]).float()
    return torch.clamp(q, grid.qmin, grid.qmax).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """q (out, in) int8 -> float32 weights."""
    qf = q.float()
    if zero is not None:
        qf = qf - _expand(zero, q.shape[1]).float()
    return qf * _expand(scale, q.shape[1])


def fake_quantize(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Round-trip w through the grid with its own RTN parameters (used by searches, not by runtimes)."""
    scale, zero = qparams(w, grid)
    return dequantize(quantize(w, scale, zero, grid), scale, zero)
