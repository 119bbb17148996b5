"""GPU numbers for the runtime: kernel checks, batch-1 decode vs roofline, throughput vs HF.

bf16, random weights, Llama-3.2-1B and Llama-3.1-8B shapes. Writes markdown tables to stdout and, with
--out DIR, results.md and results.json there. Usage: python benchmarks/runtime_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from optforge.runtime.bench import Workload, bench_batch1_decode, bench_hf, bench_hf_decode, bench_runtime
from optforge.runtime.llm import Engine, EngineConfig

SHAPES = {
    "Llama-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, roofline=1210),
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, roofline=186),
}


REPEATS = 3  # batch-1 decode, ours and HF's: the median of this many runs


def build(shape: dict):
    from transformers import AutoModelForCausalLM, LlamaConfig

    kw = {k: v for k, v in shape.items() if k != "roofline"}
    cfg = LlamaConfig(vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, **kw)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def check_kernels() -> dict:
    """Triton kernels against torch references on random data; greedy tokens of a tiny model vs HF."""
    from optforge.runtime.kernels.triton_ops import add_rms_norm, paged_decode_attention, silu_mul

    torch.manual_seed(0)
    out = {}
    B, Hq, Hkv, D, bs, nblk = 5, 32, 8, 128, 16, 128
    kc = torch.randn(nblk, bs, Hkv, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lens = torch.tensor([1, 17, 100, 255, 16], dtype=torch.int32, device="cuda")
    tables = torch.randperm(nblk, device="cuda")[: B * 16].view(B, 16).to(torch.int32)
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    got = paged_decode_attention(q, kc, vc, tables, lens, D**-0.5)
    err = 0.0
    for b in range(B):
        n = int(lens[b])
        slots = (tables[b].long()[:, None] * bs + torch.arange(bs, device="cuda")).reshape(-1)[:n]
        k = kc.view(-1, Hkv, D)[slots].float().transpose(0, 1)
        v = vc.view(-1, Hkv, D)[slots].float().transpose(0, 1)
        ref = torch.nn.functional.scaled_dot_product_attention(q[b].float()[:, None], k, v, enable_gqa=True)[:, 0]
        err = max(err, (ref - got[b].float()).abs().max().item())
    out["paged_decode_max_abs_err"] = err
    x, r, w = (torch.randn(7, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    r0 = r.clone()
    y = add_rms_norm(x, w[0], 1e-5, r)
    s = (x.float() + r0.float())
    ref = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16) * w[0]
    out["add_rms_norm_max_abs_err"] = (y.float() - ref.float()).abs().max().item()
    gu = torch.randn(7, 2 * 3000, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.silu(gu[:, :3000].float()) * gu[:, 3000:].float()
    out["silu_mul_max_abs_err"] = (silu_mul(gu).float() - ref).abs().max().item()
    return out


def check_tokens() -> dict:
    """A tiny random Llama in fp32: runtime greedy tokens (fused Triton path + graphs) vs HF generate."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).cuda().eval()
    prompts = Workload(input_len=20, num_requests=6).prompts(1000)
    with torch.inference_mode():
        hf = [model.generate(torch.tensor([p], device="cuda"), max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, 20:].tolist() for p in prompts]
    engine = Engine(model, None, EngineConfig(device="cuda", num_blocks=256, max_num_seqs=8, max_model_len=256))
    from optforge.runtime.sequence import SamplingParams

    seqs = [engine.add_request(str(i), p, SamplingParams(max_tokens=24, ignore_eos=True)) for i, p in enumerate(prompts)]
    while engine.has_unfinished:
        engine.step()
    same = sum(a == b for s, h in zip(seqs, hf) for a, b in zip(s.output_token_ids, h))
    return {"tiny_fp32_tokens_equal": f"{same}/{24 * len(prompts)}", "fused": engine.runner.fused is not None, "graphs": len(engine.runner.graphs.by_size) if engine.runner.graphs else 0}


def run_shape(name: str, shape: dict, out: dict, emit) -> None:
    model = build(shape)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    res = out.setdefault(name, {"weight_gb": weight_bytes / 1e9})
    t = time.perf_counter()
    res["hf_static_compiled_b1"] = bench_hf_decode(model, 128, 256, static_cache=True, repeats=REPEATS)
    res["hf_static_seconds_incl_compile"] = time.perf_counter() - t
    emit()
    torch._dynamo.reset()
    res["hf_eager_b64"] = bench_hf(model, Workload(input_len=128, output_len=128, num_requests=64), batch_size=64)
    emit()
    for key, overlap in (("runtime_b1_step_by_step", False), ("runtime_b1", True)):  # async_scheduling off, then on
        engine = Engine(model, None, EngineConfig(dtype="bfloat16", device="cuda", max_num_seqs=1, max_model_len=512, async_scheduling=overlap))
        runs = [bench_batch1_decode(engine, 128, 256) for _ in range(REPEATS)]
        res[key] = {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs), "runs_tok_s": [r["decode_tok_s"] for r in runs]}
        res[key]["roofline_fraction"] = res[key]["decode_tok_s"] / (3.0e12 / weight_bytes)
        del engine
    gc.collect(); torch.cuda.empty_cache()
    emit()
    engine = Engine(model, None, EngineConfig(dtype="bfloat16", device="cuda", max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=512))
    res["runtime_256x128_128"] = bench_runtime(engine, Workload(input_len=128, output_len=128, num_requests=256, concurrency=256))
    del engine, model
    gc.collect(); torch.cuda.empty_cache()
    emit()


def read_bandwidth() -> float:
    """Bytes/s of a plain streaming read on this GPU (torch.sum over 4 GB, the best of 20), beside the 3.0e12 B/s
    the fixed roofline assumes for an H100: an H200's HBM3e is faster, so its runtime fraction is quoted on both."""
    buf = torch.ones(2**30, dtype=torch.float32, device="cuda")
    out = torch.empty((), device="cuda")
    torch.sum(buf, dim=0, out=out)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.sum(buf, dim=0, out=out)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del buf
    return 4 * 2**30 / min(times)


def table(out: dict) -> str:
    bw = out.get("read_bandwidth_Bps", float("nan"))
    lines = [f"Device: {out.get('device')}, torch {torch.__version__}. bf16, random weights, prompt 128, 256 new. Batch-1 figures are "
             f"medians of {REPEATS} runs, decode steps only for both (HF: generate of 256 tokens minus generate of 1); "
             f"streaming read measured at {bw / 1e12:.2f} TB/s.", "",
             "| shape | runtime b1 decode tok/s | of roofline (3.0e12 B/s) | of measured read B/s | HF static+compile b1 decode tok/s | ratio | HF incl. prefill tok/s | b1 without overlap tok/s | runtime 256 req 128/128 out tok/s | HF eager b64 tok/s | ratio | TTFT p50/p99 s | ITL p50/p99 ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in SHAPES:
        r = out.get(name, {})
        try:
            b1, hs, tp, he = r["runtime_b1"], r["hf_static_compiled_b1"], r["runtime_256x128_128"], r["hf_eager_b64"]
        except KeyError:
            continue
        sync = r.get("runtime_b1_step_by_step", {}).get("decode_tok_s", float("nan"))
        measured = b1["decode_tok_s"] * r["weight_gb"] * 1e9 / bw
        lines.append(f"| {name} | {b1['decode_tok_s']:.0f} | {100 * b1['roofline_fraction']:.0f}% | {100 * measured:.0f}% | {hs['decode_tok_s']:.0f} "
                     f"| {b1['decode_tok_s'] / hs['decode_tok_s']:.2f}x | {hs['output_tok_s']:.0f} "
                     f"| {sync:.0f} | {tp['output_tok_s']:.0f} | {he['output_tok_s']:.0f} | {tp['output_tok_s'] / he['output_tok_s']:.1f}x "
                     f"| {tp['ttft_s']['p50']:.2f}/{tp['ttft_s']['p99']:.2f} | {1e3 * tp['itl_s']['p50']:.1f}/{1e3 * tp['itl_s']['p99']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "read_bandwidth_Bps": read_bandwidth()}

    def emit():
        if args.out:
            (args.out / "results.json").write_text(json.dumps(out, indent=1))
            (args.out / "results.md").write_text(table(out))

    for label, fn in (("kernels", check_kernels), ("tokens", check_tokens)):
        try:
            out[label] = fn()
        except Exception as exc:  # keep measuring the rest; the failure is reported in the results
            out[label] = {"error": repr(exc)[:2000]}
        emit()
    torch.backends.cuda.matmul.allow_tf32 = True
    for name in args.shapes.split(","):
        try:
            run_shape(name, SHAPES[name], out, emit)
        except Exception as exc:
            out.setdefault(name, {})["error"] = repr(exc)[:2000]
            emit()
    print(json.dumps(out, indent=1))
    print(table(out))


if __name__ == "__main__":
    main()
