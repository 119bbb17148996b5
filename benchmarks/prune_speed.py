"""Speed of pruned shapes: structured (MLP width, heads, depth) on CPU or GPU, and 2:4 sparse on GPU.

Speed does not depend on weight values, so models are built with random weights from a config; the pruned
configs are the ones the passes write (`intermediate_size`, `num_attention_heads`, `num_hidden_layers`).
Measures prefill latency (one forward over batch x prompt tokens) and decode (one token per step on a KV cache
of `prompt` tokens), median of `--repeat` timed runs after warmup. 2:4: every Linear in the decoder blocks is
magnitude-pruned 2:4 and run through `torch.sparse.to_sparse_semi_structured` (cuSPARSELt/CUTLASS).

    python benchmarks/prune_speed.py --shape smollm2 --device cpu --threads 1
    python benchmarks/prune_speed.py --shape llama-3.2-1b --device cuda --two-four
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
}


def variants(shape: dict) -> dict[str, dict]:
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    # The most query heads per KV group below the original that still divide hidden_size (transformers' rule).
    kept = max(q for q in range(1, heads // kv) if shape["hidden_size"] % (kv * q) == 0) * kv
    return {
        "dense": {},
        "MLP width -25% (prune.mlp_width)": {"intermediate_size": shape["intermediate_size"] * 3 // 4},
        f"heads {heads} -> {kept} (prune.heads, query)": {"num_attention_heads": kept},
        f"depth {shape['num_hidden_layers']} -> {shape['num_hidden_layers'] - 4} (prune.depth)": {"num_hidden_layers": shape["num_hidden_layers"] - 4},
    }


def build(shape: dict, change: dict, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**shape, **change}, max_position_embeddings=4096)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# perf_counter (wall) by default; `--clock process` counts this process's CPU seconds instead, which a
# shared, overloaded CPU distorts far less (meaningful with --threads 1 only).
CLOCK = time.perf_counter


def timed(fn, device, repeat: int) -> float:
    """Median seconds of fn() over `repeat` runs, after 3 warmups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        start = CLOCK()
        fn()
        _sync(device)
        times.append(CLOCK() - start)
    return statistics.median(times)


@torch.inference_mode()
def measure(model, *, batch: int, prompt: int, decode_steps: int, device: str, repeat: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds per step) at `batch` x `prompt`."""
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt), device=device)
    prefill = timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), device, repeat)

    def decode():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = ids[:, -1:]
        _sync(device)
        start = CLOCK()
        for _ in range(decode_steps):
            nxt = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        _sync(device)
        return (CLOCK() - start) / decode_steps

    decode()
    step = statistics.median(decode() for _ in range(max(1, repeat // 2)))
    return prefill, step


def two_four(model) -> int:
    from optforge.passes.prune.masks import prune_mask
    from optforge.passes.prune.semi_structured import sparsify_linears

    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if type(module) is torch.nn.Linear:
                    w = module.weight
                    w.masked_fill_(prune_mask(w.abs().float(), sparsity=0.0, nm=(2, 4), per_row=True), 0.0)
    return len(sparsify_linears(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--two-four", action="store_true", help="also time dense vs 2:4 prefill (CUDA only)")
    parser.add_argument("--cutlass", action="store_true", help="2:4 through CUTLASS instead of cuSPARSELt")
    parser.add_argument("--skip-structured", action="store_true")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    shape = SHAPES[args.shape]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"
    print(f"\n{args.shape} shape, random weights, {str(dtype).removeprefix('torch.')}, {where}, torch {torch.__version__}; batch {args.batch}, prompt {args.prompt}, median of {args.repeat}, {args.clock} clock\n")
    print("| variant | params | prefill ms | prefill speedup | decode ms/step | decode tok/s | decode speedup |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    if args.cutlass:
        torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS = True
    base = None
    for label, change in ({} if args.skip_structured else variants(shape)).items():
        model = build(shape, change, dtype, args.device)
        params = sum(p.numel() for p in model.parameters())
        prefill, step = measure(model, batch=args.batch, prompt=args.prompt, decode_steps=args.decode_steps, device=args.device, repeat=args.repeat)
        base = base or (prefill, step)
        print(f"| {label} | {params / 1e6:.1f}M | {prefill * 1e3:.1f} | {base[0] / prefill:.2f}x | {step * 1e3:.2f} | {args.batch / step:.0f} | {base[1] / step:.2f}x |", flush=True)
        del model
    if args.two_four:
        backend = "CUTLASS" if args.cutlass else "cuSPARSELt (PyTorch default)"
        print(f"\n2:4 semi-structured sparsity via {backend} (magnitude 2:4 on every decoder Linear), prefill, logits of the last token\n")
        print("| batch x prompt | dense ms | 2:4 ms | speedup | Linear layers on sparse kernels |")
        print("| --- | --- | --- | --- | --- |")
        for batch, prompt in ((1, 512), (1, 2048), (8, 2048), (32, 2048)):
            ids = torch.randint(0, shape["vocab_size"], (batch, prompt), device=args.device)
            model = build(shape, {}, dtype, args.device)
            with torch.inference_mode():
                dense = timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), args.device, args.repeat)
            count = two_four(model)
            with torch.inference_mode():
                sparse = timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), args.device, args.repeat)
            print(f"| {batch} x {prompt} | {dense * 1e3:.1f} | {sparse * 1e3:.1f} | {dense / sparse:.2f}x | {count} |", flush=True)
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
