"""Calibrated builds at real sizes on one GPU: wall time and peak device/host memory per pass, with onloading.

`--shape 8b`: a Llama-3.1-8B-shaped model (random bf16 weights, written once as a safetensors folder under
`--work`), built with each `--schemes` entry (int8 RTN, int4 AWQ g128, int4 GPTQ g128, FP8 static, SmoothQuant
W8A8) on `--samples` calibration samples of `--seq` tokens (BoolQ passages packed, from an exported data file).
`--shape 70b-layers --layers N`: the same with N decoder layers of the Llama-3.1-70B shape (hidden 8192,
intermediate 28672, 64 heads / 8 KV heads), for bounded memory (peak device memory the same for 4 and 12
layers) and the time per layer from which a full 80-layer build is projected.

Each pass runs as a build runs it (`Pass.run` with the build's PassContext: `device="cuda"` and the memory budget
of `--max-device-memory` and `--max-host-memory` and a resume folder under `--work`, inside the same `PeakMemory` the
build records: device peak, the process's own host memory and its resident set), on a model folder written directly
in the form a build's source conversion gives (one safetensors file and optforge.json), so the GPU machine's
64 GiB disk holds the model once; no evals run and nothing is published (the pass output is deleted after it
is measured). The model stays on the host; one decoder layer at a time visits the GPU. Weight values are
random (timing and memory do not depend on them). Each result is appended to `--out`/calibration_scale.jsonl
as it finishes.

    python benchmarks/calibration_scale_gpu.py --shape 8b --schemes int8-rtn fp8-static --out $OUT \
        --tokenizer build/gpu-carry/tokenizer --data build/gpu-carry/calib.json.gz
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from pathlib import Path

import torch

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "70b-layers": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),  # a smoke test
}
SCHEMES = {
    "int8-rtn": {"name": "quant.int8_weight_only"},
    "int4-rtn-g128": {"name": "quant.rtn", "config": {"bits": 4, "group_size": 128}},
    "int4-awq-g128": {"name": "quant.awq", "config": {"bits": 4, "group_size": 128}},
    "int4-gptq-g128": {"name": "quant.gptq", "config": {"bits": 4, "group_size": 128}},
    "fp8-static": {"name": "quant.fp8", "config": {"dynamic": False, "strategy": "channel"}},
    "smoothquant-w8a8": {"name": "quant.smoothquant", "config": {"alpha": 0.5}},
}
CALIBRATED = {"quant.awq", "quant.gptq", "quant.fp8", "quant.smoothquant"}


def make_model(path: Path, shape: str, layers: int | None, tokenizer: Path, device: str) -> Path:
    """An optforge model folder (what a build's source conversion writes) of a Llama with random bf16 weights
    (transformers' initialization) and the given tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from optforge.artifact import write_layout
    from optforge.model_io import save_model

    if (path / "config.json").is_file():
        return path
    dims = dict(SHAPES[shape])
    if layers:
        dims["num_hidden_layers"] = layers
    cfg = LlamaConfig(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16", **dims)
    started = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, AutoTokenizer.from_pretrained(tokenizer), tmp)
    write_layout(tmp, properties={"hf_causal_lm", "float_weights"}, extra={"architecture": "LlamaForCausalLM"})
    tmp.rename(path)
    print(f"wrote {path} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters) in {time.perf_counter() - started:.0f} s", flush=True)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def run(args, scheme: str, model_dir: Path) -> dict:
    from optforge.artifact import ModelArtifact
    from optforge.context import PassContext
    from optforge.pass_ import get_pass, make_config
    from optforge.recipe import CalibrationSpec, ModelSpec
    from optforge.resources import MemoryBudget, PeakMemory

    step = json.loads(json.dumps(SCHEMES[scheme]))
    if step["name"] in CALIBRATED:
        step.setdefault("config", {})["num_samples"] = args.samples
    cls = get_pass(step["name"])
    p = cls(make_config(cls, step.get("config", {})))
    out = args.work / "out" / f"{args.label}-{scheme}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    resume = args.work / "resume" / f"{args.label}-{scheme}"  # a build's resume folder: spilled activations, parked layers
    shutil.rmtree(resume, ignore_errors=True)
    ctx = PassContext(output_dir=out, model=ModelSpec(source=str(model_dir), dtype="bfloat16"),
                      calibration=CalibrationSpec(dataset="boolq", rows=(0, 3270), max_length=args.seq, pack=True), device=args.device,
                      resume_dir=resume, memory=MemoryBudget.parse(args.max_device_memory, args.max_host_memory))
    started = time.perf_counter()
    with PeakMemory(args.device) as peak:
        result = p.run(ModelArtifact.open(model_dir), ctx)
    seconds = time.perf_counter() - started
    row = {
        "shape": args.label, "scheme": scheme, "pass": p.name, "layers": args.layers or SHAPES[args.shape]["num_hidden_layers"], "max_host_memory": args.max_host_memory,
        "samples": args.samples if step["name"] in CALIBRATED else 0, "seq": args.seq, "pass_seconds": round(seconds, 1), "memory": peak.result(),
        "weight_bytes": result.weight_bytes(), "max_device_memory": args.max_device_memory, "calibration_seconds": _report(out).get("calibration_seconds"),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
    }
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(resume, ignore_errors=True)
    return row


def _report(artifact: Path) -> dict:
    layout = json.loads((artifact / "optforge.json").read_text())
    return layout.get("quantization") or {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=sorted(SCHEMES))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--max-device-memory", default=None)
    ap.add_argument("--max-host-memory", default=None)
    ap.add_argument("--tokenizer", type=Path, required=True, help="a folder with a tokenizer (any; ids stay below its vocab)")
    ap.add_argument("--data", type=Path, required=True, help="exported calibration data (optforge.evals.datasets.export_splits)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", type=Path, default=Path("build/gpu-work"))
    ap.add_argument("--out", type=Path, default=Path("build/gpu-out"))
    args = ap.parse_args()
    from optforge.evals.datasets import use_exported

    use_exported(args.data)
    args.label = args.shape if args.layers is None else f"{args.shape}-{args.layers}"
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = make_model(args.work / f"model-{args.label}", args.shape, args.layers, args.tokenizer, args.device)
    for scheme in args.schemes:
        row = run(args, scheme, model_dir)
        print(json.dumps(row), flush=True)
        with open(args.out / "calibration_scale.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        gc.collect()


if __name__ == "__main__":
    main()
