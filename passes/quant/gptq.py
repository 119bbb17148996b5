"""GPTQ: weight-only INT4/INT8 that rounds column by column and corrects the remaining columns for the
error, using the layer-input Hessian H = 2 X^T X (Frantar et al., 2022, "GPTQ").

Calibration goes layer by layer (`passes/calibration.py`): each decoder layer's inputs come from the
already-quantized layers before it. Linears that read the same input (q, k and v; gate and up) share one
Hessian, and those on the same grid are solved as one matrix (their rows stacked: GPTQ treats rows
independently, so only float rounding in the lazy block update can differ from solving them one by one). `act_order` quantizes columns in order of decreasing H diagonal, with
group scales fixed up front from the unquantized weights ("static" groups, so the checkpoint needs no
g_idx and stays a plain compressed-tensors group checkpoint). Limits: the Linears of one layer are solved
from the same layer inputs (no intra-layer sequencing); Linears outside the decoder layers get RTN and are
listed as uncalibrated in the report.
"""

from __future__ import annotations

import logging
import time

import torch

from optforge.formats.grid import Grid, dequantize, qparams, quantize
from optforge.pass_ import config, option, register
from optforge.passes.calibration import LayerAlgorithm, forward_bytes
from optforge.passes.quant.weight_only import WeightOnlyConfig, WeightOnlyPass

log = logging.getLogger(__name__)


@config
class GPTQConfig(WeightOnlyConfig):
    act_order: bool = option(False, "quantize columns in decreasing Hessian-diagonal order (static groups)")
    damp: float = option(0.01, "dampening added to H's diagonal, as a fraction of its mean")
    block_size: int = option(128, "columns per lazy-update block")
    num_samples: int | None = option(None, "calibration passages used (null: all the recipe's rows)")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, *, act_order: bool, damp: float, block_size: int):
    """weight (out, in), hessian (in, in) -> (q int8 (out, in), scale (out, G), zero (out, G) or None)."""
    W = weight.detach().float().clone()
    H = hessian.clone()
    n = W.shape[1]
    g = grid.group_size or n
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = act_order or grid.group_size is None
    scale, zero = qparams(W, grid)  # up front: static groups / per channel; else refilled per group below
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n, device=H.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W, dtype=torch.int8)
    kernel = _block_kernel(W, static=static, g=g, block_size=block_size)
    order = perm.tolist()  # column numbers on the host once: reading them per column would wait for the GPU each time
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        Err1 = None if kernel is None else _kernel_block(kernel, W, Hinv, Q, scale, zero, grid, perm, i1, i2, g=g, static=static)
        if Err1 is None:
            kernel = None
            Err1 = _round_block(W, Hinv, Q, scale, zero, grid, order, i1, i2, g=g, static=static)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)].contiguous(), scale, zero


def _block_kernel(W: torch.Tensor, *, static: bool, g: int, block_size: int):
    """The Triton block kernel (`gptq_block.py`) where it runs: CUDA with Triton, blocks of at most 256 columns,
    and groups that lie inside blocks (always so for static groups)."""
    if not W.is_cuda or block_size > 256 or not (static or block_size % g == 0):
        return None
    try:
        from optforge.passes.quant import gptq_block
    except ImportError:  # no Triton
        return None
    return gptq_block


_KERNEL_FAILED: list[str] = []  # why the block kernel could not be compiled here, once per process


def _kernel_block(kernel, W, Hinv, Q, scale, zero, grid: Grid, perm, i1: int, i2: int, *, g: int, static: bool) -> torch.Tensor | None:
    """Columns i1:i2 through the Triton kernel; None (and a warning, once) where Triton cannot compile it on this
    GPU, before anything is written, so the caller's torch loop takes the block and the rest."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    if _KERNEL_FAILED:
        return None
    try:
        if static:
            cols = perm[i1:i2] // g
            return kernel.quantize_block(W[:, i1:i2], Hinv[i1:i2, i1:i2], Q[:, i1:i2], grid, scale_cols=scale[:, cols], zero_cols=None if zero is None else zero[:, cols])
        groups = slice(i1 // g, i2 // g)  # groups lie inside the block: the kernel fills their parameters as it reaches them
        return kernel.quantize_block(W[:, i1:i2], Hinv[i1:i2, i1:i2], Q[:, i1:i2], grid, group_scale=scale[:, groups], group_zero=None if zero is None else zero[:, groups])
    except (CompilationError, OutOfResources) as exc:
        _KERNEL_FAILED.append(str(exc))
        log.warning("GPTQ's Triton block kernel does not compile here (%s); using the torch column loop", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


def _round_block(W, Hinv, Q, scale, zero, grid: Grid, order: list[int], i1: int, i2: int, *, g: int, static: bool) -> torch.Tensor:
    """Columns i1:i2 one at a time (the torch loop): round each, spread its error over the block's later
    columns; returns the block's errors for the caller's lazy update of the columns after it."""
    W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
    Err1 = torch.zeros_like(W1)
    for i in range(i2 - i1):
        col = order[i1 + i]
        gi = col // g
        if not static and col % g == 0:  # the group's g columns as they stand: the rest of this block, then the next
            group = W1[:, i : i + g]
            if group.shape[1] < g:
                group = torch.cat([group, W[:, i2 : i2 + g - group.shape[1]]], dim=1)
            s, z = qparams(group, Grid(grid.bits, None, grid.symmetric, grid.full_range))
            scale[:, gi] = s[:, 0]
            if zero is not None:
                zero[:, gi] = z[:, 0]
        w = W1[:, i]
        s_col = scale[:, gi : gi + 1]
        z_col = None if zero is None else zero[:, gi : gi + 1]
        q = quantize(w.unsqueeze(1), s_col, z_col, grid)
        Q[:, i1 + i] = q[:, 0]
        err = (w - dequantize(q, s_col, z_col)[:, 0]) / Hinv1[i, i]
        W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
        Err1[:, i] = err
    return Err1


class GPTQLayers(LayerAlgorithm):
    """Per decoder layer: each target's H from its inputs, then `gptq_quantize`; the next layer sees the result."""

    resumable = True
    restores_layer = True  # the layer's weights are dequantize(q, scale, zero): checkpoints hold int8 q only

    def __init__(self, grids: dict[str, Grid], cfg: GPTQConfig, swap=None):
        self.grids, self.cfg, self.swap = grids, cfg, swap
        self.results: dict = {}  # name -> (q, scale, zero) of the layer being calibrated
        self.solved: set[str] = set()
        self.hessians: dict[str, torch.Tensor] = {}  # by the first Linear of each group that reads one input
        self.counts: dict[str, int] = {}
        self.leader: dict[str, str] = {}  # Linear -> the first Linear reading the same input
        self._last: tuple[str, torch.Tensor | None] = ("", None)

    def watch(self, step):
        self.hessians, self.counts, self.leader, self._last = {}, {}, {}, ("", None)
        return step.targets

    def working_bytes(self, layer, batch_tokens):  # Hessians, and the solver's buffers for the widest stack of rows
        linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        hessians = sum(m.in_features**2 * 4 for m in linears)
        rows = {n: sum(m.out_features for m in linears if m.in_features == n) for n in {m.in_features for m in linears}}
        solve = max(3 * n**2 * 4 + 3 * r * n * 4 for n, r in rows.items())
        return forward_bytes(layer, batch_tokens) + hessians + solve

    def record(self, name, x):  # running mean of 2 x^T x over tokens, once per input
        previous, seen = self._last
        self._last = (name, x)
        if name in self.leader:
            if self.leader[name] != name:
                return  # a follower: its leader saw this x
        elif x is seen and previous in self.leader:
            self.leader[name] = self.leader[previous]
            return
        else:
            self.leader[name] = name
            self.hessians[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.counts[name] = 0
        t = x.shape[0]
        self.hessians[name] *= self.counts[name] / (self.counts[name] + t)
        self.counts[name] += t
        self.hessians[name] += (2 / self.counts[name]) * (x.T @ x)

    distributed = True

    def reduce(self, step):  # the mean over every rank's tokens: sum of n_r H_r, over the sum of n_r
        from optforge.distributed import all_reduce

        for name in sorted(self.hessians):
            total = int(all_reduce(torch.tensor([self.counts[name]], dtype=torch.int64))[0])
            self.hessians[name] = all_reduce(self.hessians[name] * self.counts[name]) / max(total, 1)
            self.counts[name] = total

    def apply(self, step):
        cfg = self.cfg
        self._last = ("", None)
        groups: dict[tuple[str, Grid], list[str]] = {}
        for name in step.targets:
            if name in self.leader:  # else it saw no tokens: left for the RTN fallback, reported as uncalibrated
                groups.setdefault((self.leader[name], self.grids[name]), []).append(name)
        for (leader, grid), names in groups.items():
            linears = [step.targets[n] for n in names]
            weight = torch.cat([m.weight for m in linears]) if len(linears) > 1 else linears[0].weight
            q, s, z = gptq_quantize(weight, self.hessians[leader], grid, act_order=cfg.act_order, damp=cfg.damp, block_size=cfg.block_size)
            start = 0
            for name, linear in zip(names, linears):
                rows = slice(start, start + linear.out_features)
                start = rows.stop
                parts = (q[rows], s[rows], None if z is None else z[rows])
                linear.weight.data = dequantize(*parts).to(linear.weight.dtype)
                self.results[name] = tuple(None if t is None else t.contiguous() for t in parts)
                self.solved.add(name)
        self.hessians = {}

    def finish(self, step):  # the solved Linears swapped with their integers; one that saw no token rounded to nearest
        if self.swap is not None:  # (without a Swapper, as in tests, `results` keeps every layer's integers)
            self.swap.layer(step.targets, self.results)

    def layer_results(self, step):
        kept = {}
        for name in step.targets:
            if name in self.results:
                q, s, z = self.results[name]
                kept |= {f"{name}.q": q, f"{name}.scale": s} | ({} if z is None else {f"{name}.zero": z})
        return kept

    def restore_layer(self, step, results):
        for name, linear in step.targets.items():
            if f"{name}.q" in results:
                z = results.get(f"{name}.zero")
                q, s, z = (None if t is None else t.to(linear.weight.device) for t in (results[f"{name}.q"], results[f"{name}.scale"], z))
                linear.weight.data = dequantize(q, s, z).to(linear.weight.dtype)
                self.results[name] = (q, s, z)
                self.solved.add(name)


@register
class GPTQ(WeightOnlyPass):
    name = "quant.gptq"
    version = 2  # 2: Linears reading one input share a Hessian and are solved stacked
    Config = GPTQConfig
    uses_calibration = True
    method = "gptq"

    def quantize(self, model, tokenizer, targets, grids, ctx, swap):
        from optforge.passes.calibration import calibrate, calibration_samples

        cfg = self.config
        started = time.perf_counter()
        samples = calibration_samples(self.name, tokenizer, ctx, cfg.num_samples)
        layers = GPTQLayers(grids, cfg, swap)
        calibrate(model, samples, layers, pass_name=self.name, targets=targets, progress=ctx.progress, resume_dir=ctx.resume_dir, placement=ctx.placement)
        uncalibrated = sorted(set(targets) - layers.solved)  # rounded to nearest as they are swapped
        if uncalibrated:
            log.warning("%s: %d Linear(s) saw no calibration tokens and got RTN: %s", self.name, len(uncalibrated), uncalibrated[:5])
        report = {"method": "gptq", "act_order": cfg.act_order, "samples": len(samples), "tokens": sum(s.shape[1] for s in samples), "calibration_seconds": round(time.perf_counter() - started, 2), "uncalibrated": uncalibrated}
        return {}, report
