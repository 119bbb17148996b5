"""Sequential gates against fixed-n gates on the candidates of a finished search: items used and verdicts.

Reads a search artifact's manifest (`search.candidates`), rebuilds each decided candidate from the cache (the
same pass outputs) and judges it again with the search's quality gates on all eval items at the gates' own
confidence, as a fixed-n gate does: one eval at a time, stopping at the first gate that fails on all its items
(that already decides a fixed-n verdict of fail; a fixed-n gate would still have scored every item, which the
items column counts). Speed gates are not part of the comparison (they are not sequential).

    python benchmarks/sequential_vs_fixed.py build/smollm2-search recipes/smollm2-search.yaml [--limit 6]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from optforge.gate import evaluate_gate
from optforge.pass_ import plan_passes
from optforge.pipeline import load_job, prepare, run_passes
from optforge.recipe_speed import is_speed_metric
from optforge.search import Candidate, candidate_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path, help="the search's output folder")
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--limit", type=int, default=6, help="decided candidates to compare")
    args = ap.parse_args()
    cands = [c for c in json.loads((args.artifact / "manifest.json").read_text())["search"]["candidates"]
             if c["status"] in ("passed", "failed") and c.get("looks")][: args.limit]
    job = load_job(args.recipe, output="/tmp/sequential-vs-fixed-unused", cache_dir=None, device="cpu", progress=None, force=True)
    recipe = job.recipe
    print("| candidate | sequential verdict | items (sequential) | fixed-n verdict | items (fixed-n) |\n| --- | --- | --- | --- | --- |")
    for c in cands:
        cand = Candidate(c["index"], c["passes"], int8_layers=c["int8_layers"])
        crecipe = candidate_recipe(recipe, cand, sequential=False)
        crecipe = crecipe.model_copy(update={"passes": [p.model_copy(update={"gate": None}) for p in crecipe.passes]})
        shared, _ = prepare(job, crecipe)
        artifact, _ = run_passes(shared, crecipe.passes, plan_passes(crecipe))  # cached pass outputs
        verdicts = []
        for gate in (g for g in recipe.search_gates() if not is_speed_metric(g.metric)):
            head = gate.metric.split(".")[0]
            only = shared.evals.model_copy(update={"perplexity": shared.evals.perplexity if head == "perplexity" else None, "prompts": None,
                                                   "tasks": [t for t in shared.evals.tasks if t.name == head]})
            verdicts.append(evaluate_gate(gate, shared.source_metrics, shared.measure(artifact, only)).verdict)
            if verdicts[-1] == "fail":
                break
        verdict = "fail" if "fail" in verdicts else "pass" if all(v == "pass" for v in verdicts) else "undecided"
        seq_items = sum(c["looks"]["items"].values())
        fixed_items = sum(c["looks"]["total_items"].values())
        seq_verdict = "pass" if c["status"] == "passed" or all(g["verdict"] == "pass" for g in c["gates"] if "speedup" not in g) else "fail"
        print(f"| {c['label']} | {seq_verdict} | {seq_items} | {verdict} | {fixed_items} |", flush=True)


if __name__ == "__main__":
    main()
