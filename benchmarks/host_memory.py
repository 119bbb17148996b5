"""Host memory of a build: the model memory-mapped and the output written one tensor at a time, against the whole
model copied into memory and saved through `safetensors.torch.save_file`.

  nice python benchmarks/host_memory.py [--work /tmp/host-mem] [--layers 8] [--schemes int4-rtn fp8]

A random Llama-shaped model (hidden 2048, intermediate 8192, 16/8 heads, vocab 32,000, `--layers` layers; bf16,
saved by optforge) is built on the CPU (recipe dtype bfloat16) through each scheme, in a fresh process per run,
twice: as optforge builds (weights memory-mapped, output streamed, freed memory returned to the system, RTN
rounding each Linear as it is swapped) and with `load_model(mmap=False)`, safetensors' own `save_file` and glibc's
default allocation thresholds (copy); `--modes park` adds optforge's build under `--max-host-memory 64GiB`, where a
calibrated pass parks each finished layer in a file and keeps mapped views of it. A
sampler reads the build process's /proc status every 20 ms: the peak of anonymous memory (RssAnon: what the
process itself holds, the number a memory budget is about) and of file pages mapped in (RssFile: clean pages of
the source the kernel may drop under pressure). Prints a markdown table with wall times.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

SCHEMES = {
    "int4-rtn": [{"name": "quant.rtn", "config": {"bits": 4, "group_size": 128}}],
    "int8-rtn": [{"name": "quant.rtn", "config": {"bits": 8, "group_size": None}}],
    "fp8": [{"name": "quant.fp8"}],
    # calibrated: 32 passages of at most 512 tokens; the layers stay on the CPU, changed in place of the mapped ones
    "int4-gptq": [{"name": "quant.gptq", "config": {"bits": 4, "group_size": 128, "num_samples": 32}}],
    "int4-awq": [{"name": "quant.awq", "config": {"bits": 4, "group_size": 128, "num_samples": 32}}],
    "fp8-static": [{"name": "quant.fp8", "config": {"dynamic": False, "num_samples": 32}}],
}

DRIVER = textwrap.dedent("""
    import json, sys
    import optforge, optforge.model_io as mi
    if sys.argv[2] == "copy":
        import optforge.resources
        from safetensors.torch import save_file
        optforge.resources.return_freed_memory = lambda: False
        load = mi.load_model
        mi.load_model = lambda *a, **k: load(*a, **{**k, "mmap": False})
        mi.write_safetensors = lambda path, state, metadata=None: save_file(state, path, metadata=metadata)
    from optforge.resources import MemoryBudget
    optforge.build(json.loads(sys.argv[1]), cache_dir=sys.argv[3], memory=MemoryBudget.parse(None, "64GiB" if sys.argv[2] == "park" else None))
""")


def make_model(path: Path, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from optforge.model_io import save_model

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                      vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()  # calibration text gives one token per word
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0")
    save_model(model, tokenizer, path)


def peaks(pid: int, stop: threading.Event, out: dict) -> None:
    while not stop.is_set():
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(("RssAnon", "RssFile")))
        except (FileNotFoundError, ProcessLookupError):
            break
        for key, value in fields.items():
            out[key] = max(out.get(key, 0), int(value.split()[0]) * 1024)
        time.sleep(0.02)


def run(model_dir: Path, work: Path, scheme: str, mode: str) -> dict:
    import json

    out_dir, cache = work / f"out-{scheme}-{mode}", work / f"cache-{scheme}-{mode}"
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    recipe = {"name": f"host-{scheme}", "model": {"source": str(model_dir), "dtype": "bfloat16"}, "passes": SCHEMES[scheme], "output": str(out_dir)}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(recipe), mode, str(cache)], stderr=subprocess.PIPE, text=True)
    found: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=peaks, args=(proc.pid, stop, found))
    sampler.start()
    _, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"build failed ({scheme}, {mode}):\n{err[-3000:]}")
    result = {"wall": time.perf_counter() - started, **found, "output": sum(f.stat().st_size for f in out_dir.rglob("*.safetensors"))}
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/host-mem"))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--schemes", nargs="+", default=["int4-rtn", "fp8"], choices=list(SCHEMES))
    parser.add_argument("--modes", nargs="+", default=["mmap", "copy"], choices=["mmap", "park", "copy"],
                        help="optforge's build; the same under --max-host-memory 64GiB (a calibrated pass parks finished layers); the copied one")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    model_dir = args.work / f"llama-{args.layers}l"
    if not (model_dir / "model.safetensors").is_file():
        make_model(model_dir, args.layers)
    size = (model_dir / "model.safetensors").stat().st_size
    gib = 2**30
    print(f"Llama shape, hidden 2048, {args.layers} layers, bf16 weights {size / gib:.2f} GiB; CPU build, recipe dtype bfloat16\n")
    print("| scheme | model weights | peak anonymous memory (GiB) | peak file pages (GiB) | output (GiB) | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for scheme in args.schemes:
        for mode, label in (("mmap", "optforge"), ("park", "optforge, --max-host-memory 64GiB"), ("copy", "copied, save_file, glibc defaults")):
            if mode not in args.modes:
                continue
            r = run(model_dir, args.work, scheme, mode)
            print(f"| {scheme} | {label} | {r['RssAnon'] / gib:.2f} | {r['RssFile'] / gib:.2f} | {r['output'] / gib:.2f} | {r['wall']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
