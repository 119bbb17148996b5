"""Speed gates: time a pass's output against its baseline on the recipe's workload, paired, and decide.

"I quantized it and it isn't faster" fails the build. The serving runtime's benchmark
(`optforge.runtime.bench.bench_runtime`, imported lazily: the core imports no runtime at module level) runs
the workload of `data.speed` on baseline and candidate in alternation, A B A B ..., for `repeats` rounds;
each round is a fresh engine that first serves a warm-up request. The speedup (oriented so > 1 is better) is
the geometric mean of the per-round ratios; its interval is a t-interval on the per-round log-ratios
(`optforge.evals.stats.paired_log_ratio_interval`). Verdicts as for quality gates (`evals.stats.verdict` on
the log scale): pass when the whole interval clears the threshold, fail when all of it misses, else undecided,
with the noise and about how many more repeats would decide.

Timings hold only for the machine that measured them, so results are cached by (both digests, the workload,
the dtype and the machine's fingerprint: CPU model, cores, GPU, torch version), and every result names its machine.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from optforge.artifact import ModelArtifact
from optforge.cache import Cache
from optforge.errors import RecipeError
from optforge.gate import GateOutcome
from optforge.hashing import sha256_json
from optforge.recipe import GateSpec
from optforge.recipe_speed import SPEED_METRICS, SpeedSpec
from optforge.resources import PeakMemory

log = logging.getLogger(__name__)

# Bump when what a round measures changes, so cached timings are not reused.
SPEED_VERSION = 1

# (model folder, workload, dtype) -> {metric: value} for one fresh-engine round.
RoundFn = Callable[[Path, SpeedSpec, str], dict]


@dataclass(frozen=True)
class SpeedGateResult(GateOutcome):
    """A speed gate's outcome: the keys of every gate (`baseline`/`measured` are geometric means over the rounds in
    the metric's own unit; `threshold` the measured value a sure pass needs at the point estimate; the verdict's
    scale is drop = -log(speedup) against max_drop = -log(required)), plus the speedup and `kind`."""

    # Speedup (> 1 better) with its interval, and the speedup the gate requires (1 / max_slowdown for a slowdown).
    speedup: float
    speedup_low: float
    speedup_high: float
    required: float
    machine: dict = field(default_factory=dict)
    workload: dict = field(default_factory=dict)
    cached: bool = False
    p_value: float | None = None
    kind: str = "speed"

    def describe(self) -> str:
        return describe_speed(self.to_dict())


def describe_speed(gate: dict) -> str:
    """One line for a speed gate dict: the ratio, its interval, the threshold and the verdict."""
    if gate["method"] == "not finite":
        return f"{gate['metric']}: {gate['rule']}"
    text = (
        f"{gate['metric']}: baseline {gate['baseline']:.4g}, measured {gate['measured']:.4g}; speedup {gate['speedup']:.3f}x "
        f"[{gate['speedup_low']:.3f}, {gate['speedup_high']:.3f}] at {gate['confidence']:.0%} over {gate['n']} paired rounds "
        f"vs required {gate['required']:.3f}x: {gate['verdict']}"
    )
    if gate["verdict"] == "undecided":
        noise = 100.0 * math.expm1(max(gate["ci_high"] - gate["drop"], gate["drop"] - gate["ci_low"]))
        more = f"about {gate['needed_n'] - gate['n']} more repeats would decide" if gate["needed_n"] else "the speedup sits on the threshold"
        text += f" (the noise (±{noise:.1f}%) covers the threshold; {more})"
    return text


# ---------------------------------------------------------------------------------------------- verdict


def evaluate_speed_gate(spec: GateSpec, rounds: dict, *, machine: dict, workload: dict, cached: bool = False) -> SpeedGateResult:
    """Decide a speed gate from paired rounds: `rounds` = {"baseline": [{metric: value}], "candidate": [...]}."""
    from optforge.evals import stats

    metric, higher = spec.metric, SPEED_METRICS[spec.metric]
    base = [float(r[metric]) for r in rounds["baseline"]]
    new = [float(r[metric]) for r in rounds["candidate"]]
    required = float(spec.min_speedup) if spec.min_speedup is not None else 1.0 / float(spec.max_slowdown)
    rule = f"{metric} speedup >= {required:.3f}x (" + (f"min_speedup {spec.min_speedup}" if spec.min_speedup is not None else f"max_slowdown {spec.max_slowdown}") + f") at {spec.confidence:.0%} confidence"
    common = dict(metric=metric, required=required, confidence=spec.confidence, n=len(base), machine=machine, workload=workload, cached=cached)
    if not all(math.isfinite(v) and v > 0 for v in base + new):
        return SpeedGateResult(**common, baseline=_gmean(base), measured=_gmean(new), threshold=float("nan"), passed=False, verdict="fail",
                               rule=f"{metric} was not measured as a positive finite number on every round, so the pass cannot be judged ({rule})",
                               change_pct=float("nan"), speedup=float("nan"), speedup_low=float("nan"), speedup_high=float("nan"),
                               drop=float("inf"), ci_low=float("inf"), ci_high=float("inf"), max_drop=-math.log(required), needed_n=None, method="not finite")
    # log speedup per round: log(new / base) where higher is better, log(base / new) where lower is better.
    interval = stats.paired_log_ratio_interval(base, new, confidence=spec.confidence) if higher else stats.paired_log_ratio_interval(new, base, confidence=spec.confidence)
    drop, low, high, max_drop = -interval.diff, -interval.high, -interval.low, -math.log(required)
    decided = stats.verdict(drop, low, high, max_drop, interval.n)
    b, m = _gmean(base), _gmean(new)
    return SpeedGateResult(
        **common, baseline=b, measured=m, threshold=b * required if higher else b / required,
        passed=decided.verdict == "pass" or (decided.verdict == "undecided" and spec.on_undecided == "pass"),
        rule=rule, change_pct=(m - b) / b * 100.0, verdict=decided.verdict,
        speedup=math.exp(-drop), speedup_low=math.exp(-high), speedup_high=math.exp(-low),
        drop=drop, ci_low=low, ci_high=high, max_drop=max_drop, needed_n=decided.needed_n, method=interval.method,
    )


def _gmean(values: list[float]) -> float:
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        return float("nan")
    return math.exp(sum(math.log(v) for v in values) / len(values))


# ------------------------------------------------------------------------------------------ measurement


def machine_fingerprint(speed: SpeedSpec) -> dict:
    """What a timing depends on besides the model and the workload."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if speed.device == "cuda" and torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__, "platform": platform.platform()}


def round_metrics(result: dict, peak_memory_gb: float, speed: SpeedSpec) -> dict[str, float]:
    """The gateable metrics of one `bench_runtime` result."""
    return {
        "decode_tok_s": 1.0 / result["itl_mean_s"] if result["itl_mean_s"] > 0 else float("nan"),
        "prefill_tok_s": speed.input_len / result["ttft_mean_s"] if result["ttft_mean_s"] > 0 else float("nan"),
        "throughput_tok_s": result["output_tok_s"],
        "ttft_p90_s": result["ttft_s"]["p90"],
        "itl_p99_ms": 1e3 * result["itl_s"]["p99"],
        "peak_memory_gb": peak_memory_gb,
    }


def run_round(path: Path, speed: SpeedSpec, dtype: str) -> dict[str, float]:
    """One round: a fresh engine on `path`, a warm-up request, then the workload; the engine is freed after."""
    import torch

    from optforge.runtime.bench import Workload, bench_runtime
    from optforge.runtime.llm import LLM, EngineConfig

    threads = torch.get_num_threads()
    if speed.threads and speed.backend == "torch":
        torch.set_num_threads(speed.threads)
    try:
        # KV blocks for exactly the workload (plus slack), so the cache's size does not swamp peak memory.
        per_seq = -(-(speed.input_len + speed.output_len + 16) // 16)
        config = EngineConfig(dtype=dtype, device=speed.device, backend=speed.backend, num_threads=speed.threads, max_num_seqs=speed.concurrency,
                              max_model_len=speed.input_len + speed.output_len + 16, num_blocks=speed.concurrency * per_seq + 8, verify=False)
        with PeakMemory(speed.device) as peak:  # CUDA: torch's allocations; CPU: the process's resident set (all of it)
            llm = LLM.from_resolved(path, config)
            bench_runtime(llm.engine, Workload(input_len=speed.input_len, output_len=2, num_requests=1, concurrency=1, seed=1), warmup=False)  # warm-up
            workload = Workload(input_len=speed.input_len, output_len=speed.output_len, num_requests=speed.num_requests, concurrency=speed.concurrency)
            result = bench_runtime(llm.engine, workload, warmup=False)
        del llm
    finally:
        torch.set_num_threads(threads)
        gc.collect()
    measured = peak.result()
    return round_metrics(result, measured.get("device_peak_bytes", measured["host_peak_bytes"]) / 2**30, speed)


def measure_pair(baseline: Path, candidate: Path, speed: SpeedSpec, dtype: str, *, run: RoundFn | None = None) -> dict:
    """{"baseline": [...], "candidate": [...]}: `repeats` rounds each, interleaved A B A B ..."""
    run = run or run_round
    rounds: dict[str, list] = {"baseline": [], "candidate": []}
    for r in range(speed.repeats):
        rounds["baseline"].append(run(Path(baseline), speed, dtype))
        rounds["candidate"].append(run(Path(candidate), speed, dtype))
        log.info("speed round %d/%d done", r + 1, speed.repeats)
    return rounds


def measure_speed(baseline: ModelArtifact, candidate: ModelArtifact, speed: SpeedSpec, *, dtype: str, cache: Cache, run: RoundFn | None = None) -> tuple[dict, dict, bool]:
    """(rounds, machine, cached): the pair's interleaved rounds, from the cache when this pair, workload, dtype
    and machine were measured before. The pair is cached together, so its rounds stay interleaved."""
    machine = machine_fingerprint(speed)
    key = sha256_json({"speed": SPEED_VERSION, "baseline": baseline.digest, "candidate": candidate.digest, "workload": speed.model_dump(mode="json"),
                       "dtype": dtype, "machine": machine})
    hit = cache.get_json("evals", key)
    if hit is not None:
        log.info("speed: cached (%s) for this machine", key[:12])
        return hit["rounds"], machine, True
    log.info("speed: %d interleaved rounds of %d requests (%d in / %d out) on %s", speed.repeats, speed.num_requests, speed.input_len, speed.output_len, machine["cpu"])
    rounds = measure_pair(baseline.path, candidate.path, speed, dtype, run=run)
    cache.put_json("evals", key, {"rounds": rounds, "machine": machine})
    return rounds, machine, False


def check_workload_fits(speed: SpeedSpec, model_dir: Path) -> None:
    """Refuse a workload longer than the model's context (config.json `max_position_embeddings`) before any work."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    limit, need = config.get("max_position_embeddings"), speed.input_len + speed.output_len
    if limit and need > limit:
        raise RecipeError(f"data.speed asks for {speed.input_len} prompt + {speed.output_len} new tokens = {need} per request, beyond the model's "
                          f"context of {limit} tokens (max_position_embeddings in config.json); lower input_len or output_len")


def speed_gates(specs: list[GateSpec], baseline_for: Callable[[GateSpec], ModelArtifact], candidate: ModelArtifact, speed: SpeedSpec, *, dtype: str, cache: Cache) -> list[SpeedGateResult]:
    """Evaluate a pass's speed gates; gates sharing a baseline share one measurement."""
    results = []
    for spec in specs:
        rounds, machine, cached = measure_speed(baseline_for(spec), candidate, speed, dtype=dtype, cache=cache)
        results.append(evaluate_speed_gate(spec, rounds, machine=machine, workload=speed.model_dump(mode="json"), cached=cached))
    return results
