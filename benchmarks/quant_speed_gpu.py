"""GPU speed of the quantized Linear kernels at decode shapes, Llama-3.2-1B shaped, random weights.

For each scheme every Linear of the 16 decoder layers (q, k, v, o, gate, up, down) is built as the module
optforge's runtime loads (bf16 nn.Linear, WeightOnlyLinear int8/int4, Fp8Linear dynamic/static, W8A8Linear) and one decode step's
worth of matmuls (batch M rows through all 112 Linears) is captured in a CUDA graph and replayed, so the
timing is the kernels' and not Python's. Attention, norms and the LM head are not included: this measures
what quantization changes. Also checks each kernel against its dequantized weights. Prints markdown.
Usage (GPU machine): python benchmarks/quant_speed_gpu.py --out results.json
"""

from __future__ import annotations

import argparse
import json

import torch

HIDDEN, INTER, LAYERS, KV = 2048, 8192, 16, 512
SHAPES = [("q", HIDDEN, HIDDEN), ("k", HIDDEN, KV), ("v", HIDDEN, KV), ("o", HIDDEN, HIDDEN), ("gate", HIDDEN, INTER), ("up", HIDDEN, INTER), ("down", INTER, HIDDEN)]


def build(scheme: str, weights: list[torch.Tensor]) -> list[torch.nn.Module]:
    from optforge.formats.grid import Grid, qparams, quantize
    from optforge.formats.fp8 import Fp8Linear
    from optforge.formats.int8 import W8A8Linear
    from optforge.formats.weight_only import WeightOnlyLinear

    mods = []
    for w in weights:
        n, k = w.shape
        if scheme == "bf16":
            m = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
            m.weight.data = w.to(torch.bfloat16)
        elif scheme == "fp8":
            m = Fp8Linear(k, n, False)
            m.set_float(w)
        elif scheme == "fp8-static":  # per-tensor W and A scales: the cheapest FP8 path (no per-token amax)
            m = Fp8Linear(k, n, False, {"strategy": "tensor", "dynamic": False})
            m.set_float(w, input_amax=4.5)
        elif scheme == "w8a8":
            m = W8A8Linear(k, n, False)
            m.set_float(w)
        else:
            bits, group = (8, None) if scheme == "int8" else (4, 128)
            grid = Grid(bits, group, True)
            m = WeightOnlyLinear(k, n, False, {"bits": bits, "group_size": group, "symmetric": True})
            s, z = qparams(w, grid)
            m.set_quantized(quantize(w, s, z, grid), s, z)
        mods.append(m.cuda())
    return mods


def reference_error(mod: torch.nn.Module, w: torch.Tensor, x: torch.Tensor) -> float:
    if hasattr(mod, "dequantized"):
        wd = mod.dequantized().to(x.device)
    elif hasattr(mod, "weight_scale"):
        wd = mod.weight.float() * mod.weight_scale
    else:
        wd = mod.weight.float()
    ref = x.float() @ wd.T
    return float((mod(x).float() - ref).abs().max() / ref.abs().max())


def time_step(mods: list[torch.nn.Module], m: int, iters: int = 50) -> float:
    xs = {k: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for k in (HIDDEN, INTER)}

    def step():
        for mod in mods:
            mod(xs[mod.in_features])

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def weight_bytes(mods) -> int:
    return sum(t.numel() * t.element_size() for mod in mods for t in mod.state_dict().values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 32])
    ap.add_argument("--schemes", nargs="*", default=["bf16", "int8", "int4", "fp8", "fp8-static", "w8a8"])
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=gen) * 0.02 for _ in range(LAYERS) for _, k, n in SHAPES]
    rows = []
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| scheme | kernel | Linear weight bytes | max rel err vs dequant | " + " | ".join(f"ms/step M={m} | tok/s M={m}" for m in args.batches) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("--- | ---" for _ in args.batches) + " |")
    for scheme in args.schemes:
        mods = None
        try:
            mods = build(scheme, weights)
            x = torch.randn(4, HIDDEN, device="cuda", dtype=torch.bfloat16)
            err = reference_error(mods[0], weights[0].cuda(), x)
            row = {"scheme": scheme, "kernel": getattr(mods[0], "kernel", "cuBLAS bf16"), "bytes": weight_bytes(mods), "err": err}
            for m in args.batches:
                ms = time_step(mods, m)
                row[f"ms_{m}"], row[f"tok_s_{m}"] = ms, m * 1000 / ms
        except Exception as exc:  # report and go on: one broken kernel must not hide the others
            row = {"scheme": scheme, "error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(row)
        if "error" in row:
            print(f"| {scheme} | FAILED: {row['error']} |")
        else:
            cells = " | ".join(f"{row[f'ms_{m}']:.3f} | {row[f'tok_s_{m}']:.0f}" for m in args.batches)
            print(f"| {scheme} | {row['kernel']} | {row['bytes'] / 1e9:.2f} GB | {row['err']:.2e} | {cells} |", flush=True)
        del mods
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
