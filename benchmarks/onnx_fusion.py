"""Node counts and onnxruntime CPU latency of an exported decoder before and after `fuse.onnx_graph`.

For fp32 and INT8 weight-only (per-channel RTN, as `quant.int8_weight_only`): export with `export.onnx`'s
exporter, fuse with `fuse.onnx_graph`'s fuser, then time one forward: prefill of 128 tokens and one decode
step after 128 cached tokens, at batch 1 and 8. Prints a markdown table and the machine.

  python benchmarks/onnx_fusion.py --model /path/to/hf-folder --threads 2
  python benchmarks/onnx_fusion.py --random smollm2 --threads 4   # SmolLM2-135M shape, random weights
  python benchmarks/onnx_fusion.py --graphs fp32=EXPORT_DIR,FUSED_DIR   # time graphs already built
  python benchmarks/onnx_fusion.py --graphs int8=DIR/model.onnx,DIR/fused.onnx --labels exported,fused --rounds 3

Graphs given with --graphs are timed interleaved: each round runs every case on every graph in turn, and the
table reports the median over rounds, so a load change on the shared machine hits all graphs alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)


def load(args):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if args.random:
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2), dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()


def quantize_int8(model) -> None:
    from optforge.formats import quantize_in_memory

    quantize_in_memory(model, {"scheme": "int8_weight_only"})


def measure(onnx_dir: Path, name: str, threads: int, repeats: int) -> dict:
    from optforge.runtime.onnx_runner import OnnxCausalLM

    runner = OnnxCausalLM(onnx_dir, onnx_file=name, num_threads=threads)
    out = {}
    for batch in (1, 8):
        out[f"prefill b{batch}"] = runner.time_step(batch=batch, seq=128, past=0, repeats=repeats) * 1e3
        out[f"decode b{batch}"] = runner.time_step(batch=batch, seq=1, past=128, repeats=repeats * 3) * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hugging Face model folder (fp32 weights)")
    parser.add_argument("--random", choices=["smollm2"], help="a random-weight model of this shape instead")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default="fp32,int8")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--graphs", help="LABEL=PATH,PATH,...: artifact dirs (export.onnx / fuse.onnx_graph) or .onnx files beside one")
    parser.add_argument("--labels", default="exported,fused", help="graph column for each --graphs path")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds for --graphs (median over rounds)")
    args = parser.parse_args()
    if args.graphs:
        label, paths = args.graphs.split("=")
        rows = time_interleaved(label, [Path(p) for p in paths.split(",")], args.labels.split(","), args)
        return print_table(rows, args, f"graphs {paths}")
    from optforge.passes.export.onnx_export import check_parity, export_decoder, graph_summary
    from optforge.passes.fuse.onnx_graph import fuse_graph

    work = Path(args.workdir or tempfile.mkdtemp(prefix="onnx-fusion-"))
    rows = []
    for variant in args.variants.split(","):
        model = load(args)
        if variant == "int8":
            quantize_int8(model)
        model.set_attn_implementation("sdpa")
        vdir = work / variant
        vdir.mkdir(parents=True, exist_ok=True)
        export_decoder(model, vdir / "model.onnx", opset=18)
        fused = fuse_graph(vdir / "model.onnx", vdir / "fused.onnx", int8_accuracy_level=1, max_positions=model.config.max_position_embeddings)
        for label, file in (("exported", "model.onnx"), ("fused", "fused.onnx")):
            parity = check_parity(model, vdir / file, 1e-2, pass_name="benchmark")["max_abs_logits_diff"]
            times = measure(vdir, file, args.threads, args.repeats)
            rows.append({"variant": variant, "graph": label, "nodes": graph_summary(vdir / file)["num_nodes"], "parity": max(parity.values()), **times})
        print(f"{variant}: fusions {fused['fusions']}", flush=True)
    print_table(rows, args, "random " + args.random if args.random else args.model)


def time_interleaved(label: str, paths: list[Path], graphs: list[str], args) -> list[dict]:
    import json
    import statistics

    from optforge.passes.export.onnx_export import graph_summary
    from optforge.runtime.onnx_runner import OnnxCausalLM

    runners, rows = [], []
    for path, graph in zip(paths, graphs):
        folder, file = (path.parent, path.name) if path.suffix == ".onnx" else (path, None)
        runners.append(OnnxCausalLM(folder, onnx_file=file, num_threads=args.threads))
        onnx_file = folder / (file or json.loads((folder / "optforge.json").read_text())["onnx"]["file"])
        rows.append({"variant": label, "graph": graph, "nodes": graph_summary(onnx_file)["num_nodes"], "parity": float("nan")})
    cases = {"prefill b1": (1, 128, 0), "prefill b8": (8, 128, 0), "decode b1": (1, 1, 128), "decode b8": (8, 1, 128)}
    samples = {(i, case): [] for i in range(len(runners)) for case in cases}
    for _ in range(args.rounds):
        for case, (batch, seq, past) in cases.items():
            for i, runner in enumerate(runners):
                repeats = args.repeats if seq > 1 else args.repeats * 3
                samples[(i, case)].append(runner.time_step(batch=batch, seq=seq, past=past, repeats=repeats, warmup=1) * 1e3)
    for i, row in enumerate(rows):
        row.update({case: statistics.median(samples[(i, case)]) for case in cases})
    return rows


def print_table(rows: list[dict], args, model: str) -> None:
    cols = ["prefill b1", "prefill b8", "decode b1", "decode b8"]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, onnxruntime threads {args.threads}; "
          f"model: {model}; ms per forward (median)\n")
    print("| weights | graph | nodes | max abs logits diff vs PyTorch | " + " | ".join(f"{c} (ms)" for c in cols) + " |")
    print("| --- " * (4 + len(cols)) + "|")
    for r in rows:
        print(f"| {r['variant']} | {r['graph']} | {r['nodes']} | {r['parity']:.2e} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
