"""Calibrating a mixture-of-experts model with every expert seeing every token, against routed tokens only.

  nice python benchmarks/moe_calibration.py [--tokenizer build/gpu-carry/tokenizer] [--work /tmp/moe-calib]
      [--experts 64] [--top-k 4] [--samples 4] [--seq-len 64] [--eval 16]

A random Qwen3-MoE (4 layers, hidden 256, `--experts` experts of width 128, top-`--top-k`, routers x8 so routing
is peaked as in trained models) with the given tokenizer, saved as HF saves it. Each scheme is built by
`optforge build` on `--samples` BoolQ passages of `--seq-len` tokens twice: as optforge calibrates (every expert's
Linears observe every token, the output stays the routed one) and with observation left to the router (what a
calibration without that sees: an expert gets only the tokens routed to it, none for some). Prints, per scheme
and mode: experts that got no routed calibration token, and on `--eval` held-out passages of 128 tokens the
logits' relative RMS error against the float model and top-1 agreement with it (or why the build failed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

import torch

SCHEMES = {
    "fp8 static (tensor)": [{"name": "quant.fp8", "config": {"strategy": "tensor", "dynamic": False}}],
    "int4 gptq g32": [{"name": "quant.gptq", "config": {"bits": 4, "group_size": 32}}],
    "int4 awq g32": [{"name": "quant.awq", "config": {"bits": 4, "group_size": 32}}],
    "w8a8 smoothquant": [{"name": "quant.smoothquant"}],
}


def make_model(path: Path, tokenizer_dir: Path, experts: int, top_k: int) -> None:
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_experts=experts,
                         num_experts_per_tok=top_k, norm_topk_prob=True, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=32, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(8.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def build(model_dir: Path, out: Path, cache: Path, passes: list, samples: int, seq_len: int) -> Path:
    import optforge

    recipe = {
        "name": out.name,
        "model": {"source": str(model_dir), "dtype": "float32"},
        "data": {"calibration": {"dataset": "boolq", "rows": [2000, 2000 + samples], "max_length": seq_len}},
        "passes": passes,
        "output": str(out),
    }
    return optforge.build(recipe, cache_dir=cache).output


def held_out(tokenizer, n: int) -> list[torch.Tensor]:
    from optforge.evals.datasets import load_rows
    from optforge.recipe import DataSlice

    rows = load_rows(DataSlice(dataset="boolq", rows=(0, n)))
    return [torch.tensor([tokenizer(r["passage"])["input_ids"][:128]]) for r in rows]


@torch.no_grad()
def compare(model, reference: list[torch.Tensor], texts: list[torch.Tensor]) -> tuple[float, float]:
    err = num = agree = total = 0.0
    for ids, ref in zip(texts, reference):
        got = model(ids).logits.float()
        err += float(((got - ref) ** 2).sum())
        num += float((ref**2).sum())
        agree += float((got.argmax(-1) == ref.argmax(-1)).sum())
        total += ref.shape[1]
    return (err / num) ** 0.5, agree / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, default=Path("build/gpu-carry/tokenizer"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/moe-calib"))
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--eval", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import optforge.passes.calibration as calibration
    from optforge.errors import PassError
    from optforge.model_io import load_model

    model_dir = args.work / "model"
    if not (model_dir / "config.json").is_file():
        make_model(model_dir, args.tokenizer, args.experts, args.top_k)
    base, tokenizer = load_model(model_dir)
    texts = held_out(tokenizer, args.eval)
    with torch.no_grad():
        reference = [base(ids).logits.float() for ids in texts]
    print(f"Qwen3-MoE random, 4 layers, hidden 256, {args.experts} experts x top-{args.top_k}; calibration {args.samples} x {args.seq_len} tokens; "
          f"held-out {len(texts)} x {texts[0].shape[1]} tokens\n")
    print("| scheme | expert observation | experts with no routed calibration token | logits rel. RMS error vs float | top-1 agreement |")
    print("| --- | --- | --- | --- | --- |")
    original = calibration.see_all_tokens
    for scheme, passes in SCHEMES.items():
        for mode in ("every token (optforge)", "routed tokens only"):
            routed_only = mode.startswith("routed")
            calibration.see_all_tokens = (lambda module: contextlib.nullcontext()) if routed_only else original
            tag = scheme.replace(" ", "-").replace("(", "").replace(")", "") + ("-routed" if routed_only else "-all")
            try:
                out = build(model_dir, args.work / "out" / tag, args.work / ("cache-routed" if routed_only else "cache-all"), passes, args.samples, args.seq_len)
            except PassError as exc:
                print(f"| {scheme} | {mode} | - | build fails: {str(exc).split(': ', 1)[1][:90]} | - |", flush=True)
                continue
            report = json.loads((out / "optforge.json").read_text())["quantization"]
            idle = sum(c == 0 for counts in report["expert_tokens"]["routed"].values() for c in counts)
            total = sum(len(c) for c in report["expert_tokens"]["routed"].values())
            model, _ = load_model(out)
            rel, agree = compare(model, reference, texts)
            print(f"| {scheme} | {mode} | {idle} of {total} | {rel:.4f} | {agree:.3f} |", flush=True)
    calibration.see_all_tokens = original


if __name__ == "__main__":
    main()
