"""Whole-model decode speed per quantization scheme on the GPU, through optforge's runtime.

A Llama-3.2-1B shape with random bf16 weights (speed does not depend on values); every decoder Linear is
rounded in memory to each scheme (`quantize_in_memory`; RTN, since AWQ/GPTQ give the same layout and
kernels), the LM head and embeddings stay bf16. Each model runs in the runtime (paged KV cache, fused q|k|v
and gate|up, CUDA graphs for decode): decode tokens/s at batch 1 and 32 after a 128-token prompt, and the
fraction of the bandwidth roofline (3.0e12 B/s over the bytes a decode step reads: all weights).
Also records which kernel each quantized Linear ran. Prints markdown; --out writes JSON and markdown.
Usage (GPU machine): python benchmarks/quant_model_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
from pathlib import Path

import torch

from optforge.runtime.bench import bench_decode
from optforge.formats import quantize_in_memory
from optforge.runtime.llm import Engine, EngineConfig

SCHEMES = {
    "bf16": None,
    "INT8 weight-only (channel)": {"scheme": "int8_weight_only"},
    "INT4 weight-only (g128 sym)": {"scheme": "weight_only", "bits": 4, "group_size": 128, "symmetric": True},
    "FP8 E4M3 (channel W; dynamic token A)": {"scheme": "fp8", "strategy": "channel", "dynamic": True},
    "W8A8 INT8 (channel W; dynamic token A)": {"scheme": "w8a8_int8"},
}


def model_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen and t.device.type == "cuda":
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def run_scheme(base, spec, batches, input_len, output_len) -> dict:
    model = copy.deepcopy(base) if spec else base
    if spec:
        quantize_in_memory(model, spec)
    res = {"weight_bytes": model_bytes(model)}
    for batch in batches:
        engine = Engine(model, None, EngineConfig(dtype="bfloat16", device="cuda", max_num_seqs=batch, max_model_len=input_len + output_len + 16,
                                                  max_num_batched_tokens=max(2048, batch * input_len)))
        bench_decode(engine, batch, input_len, 16)  # warm-up: autotuning and first-call work
        res[f"b{batch}"] = bench_decode(engine, batch, input_len, output_len)
        res[f"b{batch}"]["fused"] = engine.runner.fused is not None
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    res["kernels"] = kernels_by_rows(model)
    return res


def kernels_by_rows(model) -> dict:
    """The kernel a quantized o_proj picks per batch size (CUDA graph replays do not update `kernel`)."""
    layer = model.model.layers[0].self_attn.o_proj
    if not hasattr(layer, "kernel"):
        return {}
    found = {}
    with torch.inference_mode():
        for rows in (1, 32, 128):
            layer(torch.zeros(rows, layer.in_features, device="cuda", dtype=torch.bfloat16))
            found[rows] = layer.kernel
    return found


def table(out: dict, batches) -> str:
    head = " | ".join(f"decode tok/s b{b} | vs bf16" for b in batches)
    lines = [f"Device: {out['device']}, torch {out['torch']}. Llama-3.2-1B shape, random weights, prompt {out['input_len']}, "
             f"{out['output_len']} new tokens per request; roofline fraction at batch 1 = tok/s x bytes / 3.0e12.", "",
             f"| scheme | kernels | bytes read per step | {head} | b1 of roofline |", "| --- " * (4 + 2 * len(batches)) + "|"]
    base = out["schemes"].get("bf16", {})
    for name, r in out["schemes"].items():
        if "error" in r:
            lines.append(f"| {name} | FAILED: {r['error'][:200]} |")
            continue
        cells = []
        for b in batches:
            tok = r[f"b{b}"]["decode_tok_s"]
            ref = base.get(f"b{b}", {}).get("decode_tok_s")
            cells.append(f"{tok:,.0f} | {tok / ref:.2f}x" if ref else f"{tok:,.0f} | ")
        roof = r["b1"]["decode_tok_s"] * r["weight_bytes"] / 3.0e12 if "b1" in r else float("nan")
        kernels = "; ".join(f"M={m}: {k}" for m, k in r["kernels"].items()) or "cuBLAS"
        lines.append(f"| {name} | {kernels} | {r['weight_bytes'] / 1e9:.2f} GB | {' | '.join(cells)} | {100 * roof:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from runtime_gpu import SHAPES, build

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 32])
    ap.add_argument("--schemes", default="|".join(SCHEMES), help="names separated by |")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "input_len": args.input_len, "output_len": args.output_len, "schemes": {}}
    base = build(SHAPES["Llama-3.2-1B"])
    for name in args.schemes.split("|"):
        try:
            out["schemes"][name] = run_scheme(base, SCHEMES[name], args.batches, args.input_len, args.output_len)
        except Exception as exc:  # report and go on: one broken scheme must not hide the others
            out["schemes"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(json.dumps({name: out["schemes"][name]}), flush=True)
        if args.out:
            (args.out / "quant_model.json").write_text(json.dumps(out, indent=1))
            (args.out / "quant_model.md").write_text(table(out, args.batches))
    print(table(out, args.batches))


if __name__ == "__main__":
    main()
