"""The grouped expert kernel against the per-expert loop and HF's experts module, on a Qwen3-30B-A3B-shaped layer.

  source benchmarks/gpu_env.sh && python benchmarks/moe_kernel_gpu.py [--layers 4] [--out $OUT]

A random Qwen3-MoE with Qwen3-30B-A3B's layer shape (hidden 2048, 128 experts of width 768, top-8, 32/4 heads of
128; `--layers` layers, vocab 32,000; bf16 on CUDA). For batch 1 and 64 tokens, the sparse blocks' time per forward
(CUDA events, median of 20 after warm-up) with: HF's experts module (3D weights, its loop over the experts hit),
optforge's per-expert Linears in the loop (the CPU path), and the same Linears through the two grouped Triton
launches (runtime/kernels/moe.py); the whole stack's forward; and the largest difference of the grouped output
from HF's. Writes moe_kernel.json under --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch


def timed(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from optforge.formats.experts import LinearExperts, unfuse_experts

    cfg = Qwen3MoeConfig(vocab_size=32000, hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128, num_experts_per_tok=8,
                         norm_topk_prob=True, num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).eval()
    ours = copy.deepcopy(hf)
    unfuse_experts(ours)
    results = {"gpu": torch.cuda.get_device_name(), "layers": args.layers, "shape": "Qwen3-30B-A3B layer (hidden 2048, 128 experts x 768, top-8)", "rows": []}
    print(f"{results['gpu']}; {results['shape']}, {args.layers} layers, bf16\n")
    print("| tokens | HF experts (ms/layer) | per-expert loop (ms/layer) | grouped kernel (ms/layer) | grouped vs HF | stack forward HF / grouped (ms) | max diff vs HF |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for tokens in (1, 64):
        x = torch.randn(1, tokens, 2048, device="cuda", dtype=torch.bfloat16)
        ids = torch.randint(0, 32000, (1, tokens), device="cuda")
        block_hf, block_ours = hf.model.layers[0].mlp, ours.model.layers[0].mlp
        experts: LinearExperts = block_ours.experts
        with torch.inference_mode():
            t_hf = timed(lambda: block_hf(x))
            t_grouped = timed(lambda: block_ours(x))
            experts.stacked = lambda: None  # the loop (instance attribute hides the method)
            t_loop = timed(lambda: block_ours(x))
            del experts.stacked
            diff = float((block_ours(x) - block_hf(x)).abs().max())
            s_hf = timed(lambda: hf(ids), 10)
            s_ours = timed(lambda: ours(ids), 10)
        row = {"tokens": tokens, "hf_ms": t_hf, "loop_ms": t_loop, "grouped_ms": t_grouped, "stack_hf_ms": s_hf, "stack_grouped_ms": s_ours, "max_diff": diff}
        results["rows"].append(row)
        print(f"| {tokens} | {t_hf:.3f} | {t_loop:.3f} | {t_grouped:.3f} | {t_hf / t_grouped:.2f}x | {s_hf:.2f} / {s_ours:.2f} | {diff:.3g} |", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moe_kernel.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
