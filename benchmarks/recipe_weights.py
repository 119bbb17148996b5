"""Build recipes without their evals and gates, and print the sha256 of every tensor they write.

A restructuring of passes or formats must not change what a recipe builds: run this before and after on the
same machine and compare the JSON files (`--compare A B` prints the tensors that differ).

    python benchmarks/recipe_weights.py recipes/quickstart.yaml recipes/smollm2-int4-awq.yaml --out before.json
    python benchmarks/recipe_weights.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml


def tensor_hashes(weights: Path) -> dict[str, str]:
    import torch
    from safetensors import safe_open

    out = {}
    with safe_open(str(weights), "pt") as f:
        for name in sorted(f.keys()):
            tensor = f.get_tensor(name).contiguous()
            out[name] = hashlib.sha256(tensor.view(-1).view(dtype=torch.uint8).numpy().tobytes()).hexdigest()
    return out


def build_without_gates(recipe_path: Path, cache_dir: Path, work: Path) -> dict:
    import optforge

    data = yaml.safe_load(recipe_path.read_text())
    data["data"]["eval"] = {"perplexity": None, "tasks": []}
    for spec in data["passes"]:
        spec.pop("gate", None)
    source = data["model"]["source"]
    if not source.startswith("pypi:") and not Path(source).is_absolute():
        data["model"]["source"] = str((recipe_path.parent / source).resolve())
    started = time.perf_counter()
    result = optforge.build(data, output=work / recipe_path.stem, cache_dir=cache_dir)
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(result.output.iterdir())
             if p.is_file() and p.name not in ("manifest.json", "report.md", "report.html")}
    return {"seconds": round(time.perf_counter() - started, 1), "tensors": tensor_hashes(result.output / "model.safetensors"), "files": files}


def compare(a_path: Path, b_path: Path) -> int:
    a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
    failures = 0
    for recipe in sorted(set(a) | set(b)):
        if recipe not in a or recipe not in b:
            print(f"{recipe}: only in {'the first' if recipe in a else 'the second'} file")
            failures += 1
            continue
        ta, tb = a[recipe]["tensors"], b[recipe]["tensors"]
        differ = sorted(k for k in set(ta) | set(tb) if ta.get(k) != tb.get(k))
        files = sorted(k for k in set(a[recipe]["files"]) | set(b[recipe]["files"]) if a[recipe]["files"].get(k) != b[recipe]["files"].get(k))
        status = "identical" if not differ else f"{len(differ)} of {len(ta)} tensors differ: {', '.join(differ[:6])}"
        print(f"{recipe}: tensors {status}; other files differing: {', '.join(files) or 'none'}")
        failures += bool(differ)
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", type=Path)
    parser.add_argument("--cache-dir", type=Path, default=None, help="[default: a fresh temporary cache]")
    parser.add_argument("--seed", type=int, default=None, help="seed torch's global RNG before each build (for passes that draw from it)")
    parser.add_argument("--out", type=Path, help="write {recipe: {seconds, tensors, files}} here")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    args = parser.parse_args()
    if args.compare:
        sys.exit(1 if compare(*args.compare) else 0)
    work = Path(tempfile.mkdtemp(prefix="optforge-weights-"))
    cache = args.cache_dir or work / "cache"
    results = {}
    for recipe in args.recipes:
        if args.seed is not None:
            import torch

            torch.manual_seed(args.seed)
        results[recipe.name] = build_without_gates(recipe.resolve(), cache, work)
        print(f"{recipe.name}: {len(results[recipe.name]['tensors'])} tensors, {results[recipe.name]['seconds']}s", flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
