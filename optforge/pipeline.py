"""The build: source -> passes (each cached, checked and gated) -> artifact promoted atomically."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from optforge import distributed, resources
from optforge.artifact import MANIFEST_FILE, ModelArtifact, check_output_path, copy_model_files, staging_dir
from optforge.cache import Cache
from optforge.context import PassContext
from optforge.errors import DataError, GateFailed, NotServable, PassError, RecipeError, UserInputError
from optforge.evaluation import metric_summaries, run_evals
from optforge.gate import evaluate_gate
from optforge.pass_ import Pass, plan_passes
from optforge.recipe import EvalSpec, PassSpec, Recipe
from optforge.recipe_speed import is_speed_metric
from optforge.report import write_junit, write_reports
from optforge.resources import MemoryBudget, PeakMemory
from optforge.speed import check_workload_fits, speed_gates

log = logging.getLogger(__name__)

Progress = Callable[[str, int], Callable[[int], None]]


@dataclass
class PassRecord:
    name: str
    config: dict
    cache_key: str
    seconds: float = 0.0
    cached: bool = False
    metrics: dict = field(default_factory=dict)
    gate: dict | None = None  # the failing gate, else the first one (what single-gate readers show)
    gates: list[dict] = field(default_factory=list)
    weight_bytes: int = 0
    # Speed gate results (ratio, interval, the workload and the machine that measured them); timings hold
    # only for that machine.
    speed: list[dict] = field(default_factory=list)
    # Sequential gates: looks taken and items scored per eval, beside what a fixed-n gate scores; None otherwise.
    looks: dict | None = None
    # Peak device (CUDA) and host memory of the run that made the pass's output (a cached pass: the run that
    # cached it); see optforge/resources.py.
    memory: dict | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "config": self.config,
            "cache_key": self.cache_key,
            "seconds": round(self.seconds, 3),
            "cached": self.cached,
            "metrics": metric_summaries(self.metrics),
            "gate": self.gate,
            "gates": self.gates,
            "weight_bytes": self.weight_bytes,
            "speed": self.speed,
            **({"looks": self.looks} if self.looks else {}),
            **({"memory": self.memory} if self.memory else {}),
        }


@dataclass
class BuildResult:
    output: Path
    manifest: dict
    seconds: float


@dataclass(frozen=True)
class _Build:
    """What every pass of one build shares."""

    recipe: Recipe
    cache: Cache
    device: str
    progress: Progress
    # The recipe's calibration slice as JSON (enters the cache key of passes that calibrate).
    calibration: dict | None
    source_metrics: dict
    # The source model (what `baseline: source` gates, speed gates included, compare against).
    source: ModelArtifact
    # The evals every model of the build gets (see `eval_plan`); None measures nothing.
    evals: EvalSpec | None
    # Who asked for those evals, named when their data cannot be read.
    evals_for: str
    # What calibrated passes may hold (`--max-device-memory`, `--max-host-memory`).
    memory: MemoryBudget = MemoryBudget()

    def measure(self, artifact: ModelArtifact, evals: EvalSpec | None = None) -> dict:
        """The artifact's metrics on the build's evals, or on `evals` (a part of them: a chunk, one eval)."""
        return _measure(artifact, self.evals if evals is None else evals, self.evals_for, self.recipe.model.dtype, self.cache, self.device, self.progress)


def eval_plan(recipe: Recipe) -> tuple[EvalSpec | None, str]:
    """The evals a build runs, and who asks for them (named where their data cannot be read); or None, and why
    nothing is measured.

    The recipe's data.eval where it gives one (the report shows it); else the default perplexity where a gate
    reads it (without data.eval, only perplexity can be gated); else none, so a recipe with no gate and no
    data.eval needs no eval data."""
    gates = [f"passes[{i}].gate ({spec.name}) reads {gate.metric}" for i, spec in enumerate(recipe.passes) for gate in spec.gates() if not is_speed_metric(gate.metric)]
    explicit = "data" in recipe.model_fields_set and "eval" in recipe.data.model_fields_set
    if not explicit and not gates:
        return None, "no gate and no data.eval"
    evals = recipe.data.eval
    # Every eval switched off (compared whole, so new kinds of eval count too; the backend alone measures nothing).
    if evals.model_copy(update={"backend": "hf"}) == EvalSpec(perplexity=None, backend="hf"):
        return None, "data.eval switches every eval off"
    return evals, "; ".join(gates) or "data.eval"


def _measure(artifact: ModelArtifact, evals: EvalSpec | None, evals_for: str, dtype: str, cache: Cache, device: str, progress: Progress) -> dict:
    if evals is None:
        return {}
    try:
        metrics, _ = run_evals(artifact, evals, dtype=dtype, cache=cache, device=device, progress=progress)
    except DataError as exc:
        raise DataError(f"{evals_for}: its evaluation data cannot be read: {exc}") from exc
    return metrics


def _partial(metrics: dict, full: dict) -> bool:
    """Whether `metrics` cover fewer items than `full` (a sequential gate stopped before the last look)."""
    return any(name in full and m.get("n") != full[name].get("n") for name, m in metrics.items())


def _judge_in_looks(shared: _Build, gates: list, result: ModelArtifact, current_metrics: dict) -> tuple[dict, list, dict]:
    """A pass's quality gates judged on growing prefixes of the eval items (optforge.sequential); returns the
    metrics on the items scored, the gates' results at the deciding look, and what the looks used."""
    from optforge.sequential import chunk_spec, item_counts, judge_in_looks

    baselines = [shared.source_metrics if g.baseline == "source" else current_metrics for g in gates]
    counts = item_counts(shared.source_metrics)

    def measure_chunk(lo: float, hi: float) -> dict:
        return shared.measure(result, chunk_spec(shared.evals, counts, lo, hi))

    def judge(gate, baseline, measured, confidence):
        return evaluate_gate(gate.model_copy(update={"confidence": confidence}), baseline, measured)

    outcome = judge_in_looks(gates, baselines, measure_chunk, judge)
    log.info("gates judged in %d look(s): %s of %s items", outcome.looks, outcome.items, outcome.total_items)
    return outcome.metrics, outcome.results, {"looks": outcome.looks, "items": outcome.items, "total_items": outcome.total_items}


@dataclass
class _Job:
    """A recipe loaded for building or searching, with where its output goes and what that must never replace."""

    recipe: Recipe
    recipe_text: str
    recipe_path: Path | None
    out_path: Path
    protected: dict
    cache: Cache
    device: str
    progress: Progress
    force: bool
    passes: list[Pass]  # the recipe's passes, planned (empty for a search, which plans each candidate)
    memory: MemoryBudget = MemoryBudget()


def load_job(recipe: Recipe | str | Path | dict, *, output: str | Path | None, cache_dir: str | Path | None, device: str, progress: Progress | None,
             force: bool, memory: MemoryBudget | None = None) -> _Job:
    """Parse the recipe (object, dict or YAML path) and check its output path and memory budget before any work."""
    memory = memory or MemoryBudget()
    if memory.device is not None and not device.startswith("cuda"):
        raise UserInputError(f"--max-device-memory bounds what a build holds on a GPU, but the build runs on {device!r}: use --device cuda, or --max-host-memory for the host")
    from optforge.recipe import load_recipe, parse_recipe

    recipe_text, recipe_path = None, None
    base_dir = Path.cwd()
    if isinstance(recipe, (str, Path)):
        recipe_path = Path(recipe).resolve()
        base_dir = recipe_path.parent
        recipe, recipe_text = load_recipe(recipe, check_passes=False)
    elif isinstance(recipe, dict):
        recipe = parse_recipe(recipe, check_passes=False)
    # each pass config parsed once, here, before anything is written (a search plans each candidate itself)
    passes = plan_passes(recipe, source=str(recipe_path or "<python>"), device=device) if recipe.search is None else []
    if recipe_text is None:
        import yaml

        recipe_text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    out_path = (Path(output) if output else base_dir / recipe.output).resolve()
    cache = Cache(cache_dir)
    protected = {"the cache": cache.root}
    if Path(recipe.model.source).expanduser().exists():
        protected["the source model"] = Path(recipe.model.source).expanduser()
    if recipe_path is not None:
        protected["the recipe file"] = recipe_path
    check_output_path(out_path, force=force, protected=protected)  # before any work, and again before publishing
    return _Job(recipe, recipe_text, recipe_path, out_path, protected, cache, device, progress or (lambda desc, total: (lambda n=1: None)), force, passes, memory)


def prepare(job: _Job, recipe: Recipe | None = None) -> tuple[_Build, "SourceInfo"]:
    """Resolve the source model and measure it with the evals `recipe` (default: the job's) needs; returns what
    every pass shares, and the source's manifest entry."""
    from optforge.sources import resolve_source

    recipe = recipe or job.recipe
    calibration = recipe.data.calibration.cache_identity() if recipe.data.calibration else None
    source, source_info = resolve_source(recipe.model, job.cache)
    if recipe.data.speed is not None:
        check_workload_fits(recipe.data.speed, source.path)
    evals, evals_for = eval_plan(recipe)
    if evals is None:
        log.warning("no quality was measured (%s)", evals_for)
    source_metrics = _measure(source, evals, evals_for, recipe.model.dtype, job.cache, job.device, job.progress)
    shared = _Build(recipe=recipe, cache=job.cache, device=job.device, progress=job.progress, calibration=calibration, source_metrics=source_metrics,
                    source=source, evals=evals, evals_for=evals_for, memory=job.memory)
    return shared, source_info


def run_passes(shared: _Build, specs: list[PassSpec], passes: list[Pass]) -> tuple[ModelArtifact, list[PassRecord]]:
    """Run passes in order from the source, each gated; raises GateFailed at the first failing gate (the
    records of the passes before it are on the exception as `records`)."""
    current, current_metrics = shared.source, shared.source_metrics
    records: list[PassRecord] = []
    try:
        for spec, p in zip(specs, passes):
            current, current_metrics, record = _run_pass(shared, spec, p, current, current_metrics)
            records.append(record)
    except GateFailed as exc:
        exc.records = records + [exc.record]
        raise
    return current, records


def publish(job: _Job, shared: _Build, source_info: "SourceInfo", artifact: ModelArtifact, records: list[PassRecord], *, recipe: Recipe | None = None,
            write_extra=None) -> dict:
    """Stage the artifact's files, reports and manifest beside the output path and swap them in; returns the
    manifest as a reader sees it. `write_extra(folder)` adds files (and returns manifest keys) before the
    manifest hashes the folder."""
    from optforge.manifest import make_manifest

    check_output_path(job.out_path, force=job.force, protected=job.protected)
    with staging_dir(job.out_path) as tmp:
        copy_model_files(artifact.path, tmp, folders=True)
        write_reports(tmp, job.recipe.name, metric_summaries(shared.source_metrics), [r.to_dict() for r in records])
        extra = write_extra(tmp) if write_extra else None
        make_manifest(tmp, recipe=recipe or shared.recipe, recipe_text=job.recipe_text, source=source_info, source_metrics=shared.source_metrics,
                      records=records, device=job.device, evals=shared.evals, extra=extra)
    return json.loads((job.out_path / MANIFEST_FILE).read_text())  # JSON types


def build(recipe: Recipe | str | Path | dict, *, output: str | Path | None = None, cache_dir: str | Path | None = None, device: str = "cpu", progress: Progress | None = None,
          junit: str | Path | None = None, force: bool = False, memory: MemoryBudget | None = None) -> BuildResult:
    """Build a recipe (object, dict or YAML path). Raises GateFailed (nothing written) when a gate fails.

    `junit`: also write each gate as a JUnit test case to this file, whether the build passes or not.
    `force`: replace an output folder that is not an optforge artifact (never the source model, the cache,
    the recipe, the working or home directory; see `artifact.check_output_path`).
    `memory`: what calibrated passes may hold on the device and the host (passes/onload.py)."""
    started = time.perf_counter()
    resources.return_freed_memory()
    device = distributed.init(device)  # under torchrun: this rank's device (cuda:LOCAL_RANK), the process group joined
    job = load_job(recipe, output=output, cache_dir=cache_dir, device=device, progress=progress, force=force, memory=memory)
    if job.recipe.search is not None:
        raise RecipeError("this recipe has a search section: run it with `optforge search` (optforge.search), which builds every candidate")
    if not distributed.is_leader():
        return _follow(job, started)
    with distributed.leader_first():
        shared, source_info = prepare(job)
    try:
        artifact, records = run_passes(shared, job.recipe.passes, job.passes)
    except GateFailed as exc:
        if junit:
            write_junit(junit, job.recipe.name, [r.to_dict() for r in exc.records], failed=(exc.pass_name, exc.result))
        raise
    if junit:
        write_junit(junit, job.recipe.name, [r.to_dict() for r in records])
    manifest = publish(job, shared, source_info, artifact, records)
    distributed.barrier()  # the other ranks end with the published build
    return BuildResult(output=job.out_path, manifest=manifest, seconds=time.perf_counter() - started)


def _run_pass(shared: _Build, spec: PassSpec, p: Pass, current: ModelArtifact, current_metrics: dict) -> tuple[ModelArtifact, dict, PassRecord]:
    recipe, cache, device, progress = shared.recipe, shared.cache, shared.device, shared.progress
    missing = p.requires - current.properties
    if missing:
        raise PassError(p.name, f"its input lacks {sorted(missing)} (input has {sorted(current.properties)}); reorder the recipe's passes so an earlier pass does not remove them")
    key = p.cache_key(current.digest, shared.calibration, recipe.model.dtype)
    record = PassRecord(name=p.name, config=p.config_dict(), cache_key=key)
    started = time.perf_counter()

    ranks = distributed.world_size() > 1

    def run(tmp: Path) -> dict:
        if ranks:  # the other ranks run the pass with this one (their share of the calibration, resuming from its checkpoints)
            distributed.broadcast({"run": True, "resume": str(cache.resume_dir(key))})
        log.info("pass %s: running%s", p.name, f" on {distributed.world_size()} processes" if distributed.world_size() > 1 else "")
        with PeakMemory(device) as peak:
            p.run(current, PassContext(output_dir=tmp, model=recipe.model, calibration=recipe.data.calibration, device=device, progress=progress,
                                       resume_dir=cache.resume_dir(key), memory=shared.memory))
        return {"memory": peak.result()}

    entry, record.cached = cache.get_or_build_dir("passes", key, run)
    if ranks:
        if record.cached:
            distributed.broadcast({"run": False})  # the pass's output was cached: nothing for the other ranks to run
        distributed.broadcast({"entry": str(entry.path)})
    record.memory = (entry.run or {}).get("memory")
    if record.cached:
        log.info("pass %s: cached (%s, files verified)", p.name, key[:12])
    result = ModelArtifact.open(entry.path, entry.files)
    absent = p.produces - result.properties
    if absent:
        raise PassError(p.name, f"promised to produce {sorted(absent)} but its output lacks them (a bug in the pass)")
    record.seconds = time.perf_counter() - started
    record.weight_bytes = result.weight_bytes()
    quality = [g for g in spec.gates() if not is_speed_metric(g.metric)]
    if any(g.baseline == "previous" for g in quality) and _partial(current_metrics, shared.source_metrics):
        current_metrics = shared.measure(current)  # the previous pass stopped early: gates compare against all items
    if any(g.sequential for g in quality) and shared.evals is not None:
        metrics, results, record.looks = _judge_in_looks(shared, quality, result, current_metrics)
    else:
        metrics = shared.measure(result)
        results = [evaluate_gate(g, shared.source_metrics if g.baseline == "source" else current_metrics, metrics) for g in quality]
    record.metrics = metrics
    if all(r.passed for r in results) and len(quality) < len(spec.gates()):  # time only what passed on quality
        try:
            timed = speed_gates([g for g in spec.gates() if is_speed_metric(g.metric)], lambda g: shared.source if g.baseline == "source" else current,
                                result, recipe.data.speed, dtype=recipe.model.dtype, cache=cache)
        except UserInputError as exc:  # ArtifactError included: the backend refuses this artifact's formats
            raise NotServable(p.name, f"the speed gates' backend ({recipe.data.speed.backend} on {recipe.data.speed.device}) cannot run its output: {exc}") from exc
        record.speed = [r.to_dict() for r in timed]
        results += timed
    record.gates = [r.to_dict() for r in results]
    failed = [r for r in results if not r.passed]
    if results:
        record.gate = (failed or results)[0].to_dict()
    if failed:
        exc = GateFailed(p.name, "; ".join(r.describe() for r in failed), failed[0].to_dict())
        exc.record = record  # every gate of the pass, its metrics and weight bytes
        raise exc
    for gate in results:
        log.info("gate after %s %s: %s", p.name, "passed" if gate.verdict == "pass" else "passed (undecided, on_undecided: pass)", gate.describe())
    return result, metrics, record


def _follow(job: _Job, started: float) -> BuildResult:
    """A rank other than 0 of a torchrun build: run every pass that rank 0 runs (its share of the calibration),
    into a scratch folder, and take rank 0's cached output as the next pass's input. Rank 0 converts the source,
    measures, gates and publishes; a failing gate there ends this process with it (torchrun stops the group)."""
    import shutil
    import tempfile

    from optforge.sources import resolve_source

    with distributed.leader_first():  # rank 0 has converted the source into the cache
        current, _ = resolve_source(job.recipe.model, job.cache)
    for spec, p in zip(job.recipe.passes, job.passes):
        order = distributed.broadcast(None)
        if order["run"]:
            scratch = Path(tempfile.mkdtemp(prefix=f"optforge-rank{distributed.rank()}-"))
            (scratch / "out").mkdir()
            try:
                p.run(current, PassContext(output_dir=scratch / "out", model=job.recipe.model, calibration=job.recipe.data.calibration, device=job.device,
                                           resume_dir=Path(order["resume"]), memory=job.memory))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        current = ModelArtifact.open(distributed.broadcast(None)["entry"])
    distributed.barrier()  # rank 0 has published
    return BuildResult(output=job.out_path, manifest={}, seconds=time.perf_counter() - started)
