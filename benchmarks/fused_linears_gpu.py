"""Module-level fusion (q/k/v and gate/up as one matmul each) through a plain torch greedy loop on CUDA.

Random-weight Llama shapes (speed does not depend on values), HF eager forward with a DynamicCache,
prompt 128, 128 new tokens, batch 1 and 8; tokens/s before and after `fuse_sibling_linears`, and whether
the greedy tokens are identical. Prints a markdown table and the GPU.

  python benchmarks/fused_linears_gpu.py --shapes llama-3.2-1b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def greedy(model, prompt, new_tokens: int):
    """Token ids (B, new_tokens) and seconds of the decode steps (prefill excluded), synchronised."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        out = [token]
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            out.append(token)
        torch.cuda.synchronize()
    return torch.cat(out, dim=1), time.perf_counter() - started


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from optforge.formats.fused import fuse_sibling_linears

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="llama-3.2-1b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    for shape in args.shapes.split(","):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), dtype=dtype).eval()
        prompts = {b: torch.randint(0, model.config.vocab_size, (b, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(b)) for b in (1, 8)}
        base_tokens = {}
        for batch, prompt in prompts.items():
            greedy(model, prompt, 8)  # warm-up
            base_tokens[batch], seconds = greedy(model, prompt, args.new_tokens)
            rows.append((shape, batch, "unfused", batch * (args.new_tokens - 1) / seconds, None))
        counts = fuse_sibling_linears(model)
        for batch, prompt in prompts.items():
            greedy(model, prompt, 8)
            tokens, seconds = greedy(model, prompt, args.new_tokens)
            same = float((tokens == base_tokens[batch]).all(dim=1).float().mean())
            rows.append((shape, batch, f"fused {counts}", batch * (args.new_tokens - 1) / seconds, same))
        del model
        torch.cuda.empty_cache()
    print(f"\nGPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, prompt 128, {args.new_tokens} new tokens, HF eager + DynamicCache\n")
    print("| shape | batch | modules | decode tok/s | rows with identical greedy tokens |")
    print("| --- | --- | --- | --- | --- |")
    for shape, batch, label, tps, same in rows:
        print(f"| {shape} | {batch} | {label} | {tps:.1f} | {'-' if same is None else f'{same:.0%}'} |")


if __name__ == "__main__":
    main()
