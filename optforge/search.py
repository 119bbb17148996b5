"""`optforge search`: build every candidate of a recipe's `search:` section, judge each with the same gates
against the source model, and publish the one the objective prefers among those that pass.

Every candidate is the recipe's `passes` followed by one choice per search step (optforge/search_spec.py), with
the search's gates on its last pass. Pass outputs and evals come from the content-addressed cache, so a second
search re-runs nothing and a widened one runs only its new candidates.

Order and reuse:
- With an objective of weight bytes alone, candidates run from the fewest nominal bits up (cheaper calibration
  first at equal bits): once one passes, a candidate whose output is no smaller cannot win and is not
  evaluated (`search.exhaustive: true` evaluates it anyway, for the report).
- With a speed term in the objective, candidates run from the most bits down (the likeliest to pass first) and
  every one is evaluated, since speed is known only once measured.
- Gates run sequentially (`search.sequential`, default on: optforge/sequential.py), so clear passes and
  clear failures cost few eval items.
- A weight-only candidate that fails gets fallback candidates (`search.fallback`): its 1, 2, 4, ... most
  sensitive decoder layers at INT8 (optforge/sensitivity.py), tried in that order until one passes.

Candidates run one at a time in this process. `evaluate_candidate` depends only on its arguments (the shared
build state, the recipe, the candidate) and its results are plain data (`Candidate.to_dict`); candidates share
nothing but the cache folder, whose per-key locks make concurrent builds of one entry safe. That is the seam for
an executor that fans candidates out to worker processes or Ray tasks; none is built in.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from optforge.errors import GateFailed, NotServable, OptforgeError, RecipeError
from optforge.pass_ import get_pass, plan_passes
from optforge.pipeline import load_job, prepare, publish, run_passes
from optforge.recipe import Recipe

log = logging.getLogger(__name__)

# Bump when how layer sensitivity is measured changes: it keys the cached rankings.
SENSITIVITY_VERSION = 1
# Rough cost of a pass's calibration, for ordering candidates of equal bits (cheapest first).
CALIBRATION_COST = {"quant.awq": 2, "quant.gptq": 3, "quant.smoothquant": 1}


class SearchFailed(OptforgeError):
    """No candidate passed every gate. Exit code 3, like a failed gate; nothing is written."""

    exit_code = 3

    def __init__(self, message: str, candidates: list[dict]):
        self.candidates = candidates
        super().__init__(message)


@dataclass
class Candidate:
    index: int
    passes: list[dict]  # pass specs {name, config}, after the recipe's own passes
    int8_layers: list[int] = field(default_factory=list)  # decoder layers moved to INT8 (fallback candidates)
    status: str = "pending"  # passed | failed | not evaluated | not servable | error
    reason: str = ""
    weight_bytes: int | None = None
    bits_per_weight: float | None = None
    gates: list[dict] = field(default_factory=list)
    looks: dict | None = None
    seconds: float = 0.0
    score: float | None = None

    @property
    def label(self) -> str:
        parts = []
        for p in self.passes:
            cfg = ", ".join(f"{k}={v}" for k, v in p["config"].items() if k != "int8_layers")
            parts.append(f"{p['name']}({cfg})" if cfg else p["name"])
        text = " + ".join(parts) or "(source)"
        return text + (f" + layers {','.join(map(str, self.int8_layers))} at int8" if self.int8_layers else "")

    @property
    def nominal_bits(self) -> int:
        bits = [int(p["config"].get("bits", 4 if p["name"] in ("quant.rtn", "quant.awq", "quant.gptq") else 8)) for p in self.passes if p["name"].startswith("quant.")]
        return min(bits, default=32)

    def to_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items()}
        out["label"] = self.label
        return out


def _decoder_tensors(path: Path) -> tuple[int, int]:
    """Over the tensors under `model.layers.` in an HF folder's safetensors files: the weights of the 2-D `.weight`
    tensors (the Linear weights of a float model), and the bytes of all of them (quantized weights with their
    scales and zero points, norms)."""
    from safetensors import safe_open

    weights = nbytes = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                if name.startswith("model.layers."):
                    t = f.get_slice(name)
                    shape = t.get_shape()
                    nbytes += math.prod(shape) * _itemsize(t.get_dtype())
                    weights += math.prod(shape) if name.endswith(".weight") and len(shape) == 2 else 0
    return weights, nbytes


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}.get(dtype, 4)


def candidate_recipe(recipe: Recipe, cand: Candidate, sequential: bool) -> Recipe:
    """The recipe that builds `cand`: the recipe's passes, then the candidate's, the last with the search gates."""
    specs = [p.model_dump() for p in recipe.passes]
    passes = [dict(p) for p in cand.passes]
    gates = [{**g.model_dump(), "sequential": g.sequential or sequential} for g in recipe.search_gates()]
    if passes:
        passes[-1] = {**passes[-1], "gate": gates}
    data = recipe.model_dump()
    data.update(passes=specs + passes, search=None)
    return Recipe.model_validate(data)


def objective_score(cand: Candidate, weights: dict[str, float], source_bytes: int) -> float:
    """sum(w * log(benefit)): benefit = source bytes / candidate bytes, or the speed gate's speedup."""
    score = 0.0
    for term, w in weights.items():
        if term == "weight_bytes":
            score += w * math.log(source_bytes / max(cand.weight_bytes or source_bytes, 1))
        else:
            gate = next((g for g in cand.gates if g["metric"] == term and "speedup" in g), None)
            score += w * math.log(gate["speedup"]) if gate else float("-inf")
    return score


def evaluate_candidate(shared, recipe: Recipe, cand: Candidate, *, sequential: bool, source_decoder_weights: int) -> Candidate:
    """Build and judge one candidate; fills its status, bytes, gates and seconds."""
    started = time.perf_counter()
    try:
        crecipe = candidate_recipe(recipe, cand, sequential)
        passes = plan_passes(crecipe, device=shared.device)
        artifact, records = run_passes(dataclasses.replace(shared, recipe=crecipe), crecipe.passes, passes)
        cand.status = "passed"
    except GateFailed as exc:
        records, artifact = exc.records, None
        cand.status, cand.reason = "failed", str(exc)
    except NotServable as exc:
        records, artifact = [], None
        cand.status, cand.reason = "not servable", str(exc)
    except (RecipeError, OptforgeError) as exc:
        records, artifact = [], None
        cand.status, cand.reason = "error", str(exc)
    cand.seconds = time.perf_counter() - started
    if records:
        last = records[-1]
        cand.weight_bytes, cand.gates, cand.looks = last.weight_bytes, last.gates, last.looks
        entry = shared.cache.root / "passes" / last.cache_key
        if entry.is_dir() and source_decoder_weights:
            cand.bits_per_weight = 8.0 * _decoder_tensors(entry)[1] / source_decoder_weights
    cand._artifact, cand._records = artifact, records  # not part of to_dict: the chosen one is published
    return cand


def _fallback_candidates(shared, recipe: Recipe, failed: Candidate, memo: dict | None = None) -> list[Candidate]:
    """INT8-fallback versions of a failed weight-only candidate: its k most sensitive layers at INT8, k = 1, 2, 4, ...
    `memo` keeps each proxy scheme's ranking for the rest of the search (candidates differing in other ways share it)."""
    from optforge.context import PassContext
    from optforge.model_io import load_model
    from optforge.passes.calibration import calibration_samples
    from optforge.hashing import sha256_json
    from optforge.sensitivity import LayerSensitivity, layer_exclude_patterns, layer_sensitivities, proxy_spec

    fb = recipe.search.fallback
    last = failed.passes[-1]
    spec = proxy_spec(last["name"], last["config"])
    key = repr(sorted(spec.items()))
    memo = {} if memo is None else memo
    if key not in memo:  # cached like an eval: by the source, the scheme, the calibration rows and the dtype
        cache_key = sha256_json({"sensitivity": SENSITIVITY_VERSION, "model": shared.source.digest, "spec": spec, "calibration": shared.calibration,
                                 "rows": fb.rows, "dtype": recipe.model.dtype})
        hit = shared.cache.get_json("evals", cache_key)
        if hit is None:
            model, tokenizer = load_model(shared.source.path, dtype=recipe.model.dtype, device=shared.device)
            ctx = PassContext(output_dir=shared.cache.root, model=recipe.model, calibration=recipe.data.calibration, device=shared.device,
                              progress=shared.progress)
            batches = calibration_samples("search.fallback", tokenizer, ctx, fb.rows)
            hit = {"layers": [s.to_dict() for s in layer_sensitivities(model, batches, spec, progress=shared.progress)]}
            shared.cache.put_json("evals", cache_key, hit)
        memo[key] = [LayerSensitivity(**s) for s in hit["layers"]]
    scores = memo[key]
    log.info("layer sensitivity to %s: %s", last["name"], ", ".join(f"{s.layer}: {s.loss_increase:+.4f}" for s in scores[:8]))
    out, k = [], 1
    while k <= min(fb.max_layers, len(scores)):
        layers = sorted(s.layer for s in scores[:k])
        config = {**last["config"], "int8_layers": layer_exclude_patterns(layers)}
        out.append(Candidate(-1, failed.passes[:-1] + [{"name": last["name"], "config": config}], int8_layers=layers))
        k *= 2
    return out


@dataclass
class SearchResult:
    output: Path
    chosen: dict
    candidates: list[dict]
    seconds: float
    manifest: dict


def search(recipe: Recipe | str | Path | dict, *, output: str | Path | None = None, cache_dir: str | Path | None = None, device: str = "cpu",
           progress=None, force: bool = False, memory=None) -> SearchResult:
    """Run a recipe's search; publish the chosen candidate at the output path. Raises SearchFailed (exit 3,
    nothing written) when no candidate passes, naming the closest one and the gate that stopped it."""
    from optforge.search_report import search_extra

    started = time.perf_counter()
    job = load_job(recipe, output=output, cache_dir=cache_dir, device=device, progress=progress, force=force, memory=memory)
    recipe = job.recipe
    spec = recipe.search
    if spec is None:
        raise RecipeError("this recipe has no search section; build it with `optforge build`, or add search.steps and search.gates")
    weights = spec.objective_weights()
    speed_objective = any(t != "weight_bytes" for t in weights)
    cands = [Candidate(i, passes) for i, passes in enumerate(spec.candidates())]
    for cand in cands:
        for p in cand.passes:
            get_pass(p["name"])  # an unknown pass name fails here, before any work
    cost = lambda c: max((CALIBRATION_COST.get(p["name"], 0) for p in c.passes), default=0)  # noqa: E731
    cands.sort(key=lambda c: (-c.nominal_bits if speed_objective else c.nominal_bits, cost(c)))
    shared, source_info = prepare(job, candidate_recipe(recipe, cands[0], spec.sequential))
    source_bytes = shared.source.weight_bytes()
    source_weights, _ = _decoder_tensors(shared.source.path)
    done: list[Candidate] = []
    queue = list(cands)
    sensitivity: dict = {}  # proxy scheme -> layer ranking, shared by fallback candidates
    while queue:
        cand = queue.pop(0)
        cand.index = len(done)
        log.info("candidate %d: %s", cand.index, cand.label)
        evaluate_candidate(shared, recipe, cand, sequential=spec.sequential, source_decoder_weights=source_weights)
        if cand.status == "passed":
            cand.score = objective_score(cand, weights, source_bytes)
        done.append(cand)
        if (cand.status == "failed" and spec.fallback and not cand.int8_layers and cand.passes
                and cand.passes[-1]["name"] in spec.fallback.for_):
            queue[:0] = _fallback_candidates(shared, recipe, cand, sensitivity)
        if cand.int8_layers and cand.status == "passed":  # more INT8 layers only add bytes
            queue = [c for c in queue if not (c.int8_layers and c.passes[-1]["name"] == cand.passes[-1]["name"] and c.passes[:-1] == cand.passes[:-1])]
        if not spec.exhaustive and not speed_objective:
            smallest = min((c.weight_bytes for c in done if c.status == "passed"), default=None)
            if smallest is not None:
                keep = []
                for c in queue:
                    if c.nominal_bits > min(d.nominal_bits for d in done if d.status == "passed"):
                        c.status, c.reason, c.index = "not evaluated", f"more bits than a passing candidate of {smallest:,} bytes: it cannot be smaller", -1
                        done.append(c)
                    else:
                        keep.append(c)
                queue = keep
    passed = [c for c in done if c.status == "passed"]
    table = [c.to_dict() for c in done]
    if not passed:
        closest = _closest(done)
        raise SearchFailed(f"no candidate passed every gate; the closest was {closest.label}: {closest.reason}" if closest
                           else "no candidate could be built and judged; see each candidate's error above", table)
    chosen = max(passed, key=lambda c: (c.score, -_tightest_gate(c)))
    why = f"the largest objective score ({chosen.score:.4f}) among {len(passed)} passing candidate(s): {_describe_objective(weights)}"
    ties = [c for c in passed if c is not chosen and c.score == chosen.score]
    if ties:
        why += f"; tied with {', '.join(c.label for c in ties)}, it keeps the most room under its tightest quality gate"
    log.info("chosen: %s (%s)", chosen.label, why)
    extra = search_extra(recipe, table, chosen.to_dict(), why, source_bytes=source_bytes)
    manifest = publish(job, dataclasses.replace(shared, recipe=candidate_recipe(recipe, chosen, spec.sequential)), source_info, chosen._artifact, chosen._records,
                       write_extra=extra)
    return SearchResult(job.out_path, chosen.to_dict(), table, time.perf_counter() - started, manifest)


def _tightest_gate(cand: Candidate) -> float:
    """The largest fraction of its allowed drop that any quality gate of the candidate uses (0 when none)."""
    return max((g["drop"] / g["max_drop"] for g in cand.gates if "speedup" not in g and g.get("max_drop")), default=0.0)


def _describe_objective(weights: dict[str, float]) -> str:
    terms = [("smallest weight bytes" if t == "weight_bytes" else f"largest {t} speedup") + (f" (weight {w:g})" if len(weights) > 1 else "") for t, w in weights.items()]
    return ", ".join(terms)


def _closest(done: list[Candidate]) -> Candidate | None:
    """The failed candidate nearest to passing: fewest failing gates, then the smallest excess over a threshold
    (relative to the threshold)."""
    failed = [c for c in done if c.status == "failed" and c.gates]

    def distance(c: Candidate) -> tuple[int, float]:
        bad = [g for g in c.gates if not g["passed"]]
        excess = max((abs(g["drop"] - g["max_drop"]) / max(abs(g["max_drop"]), 1e-9) for g in bad), default=0.0)
        return len(bad), excess

    return min(failed, key=distance, default=None)
