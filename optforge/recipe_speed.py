"""The speed workload of a recipe (`data.speed`) and the metrics a speed gate reads.

A speed gate (`gate: {metric: decode_tok_s, min_speedup: 1.2}` or `{metric: ttft_p90_s, max_slowdown: 1.05}`)
compares a pass's output with its baseline on this workload, run by the serving runtime's benchmark
(`optforge.speed`). Kept apart from `optforge.recipe` so that file stays small; it imports nothing of optforge.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Speed metrics a gate can read, and whether higher is better. "Speedup" is always oriented so that > 1 is
# better: candidate / baseline for higher-is-better metrics, baseline / candidate for the others.
SPEED_METRICS: dict[str, bool] = {
    "decode_tok_s": True,  # per-stream decode tokens/s: 1 / mean inter-token latency
    "prefill_tok_s": True,  # prompt tokens / mean time to first token (queueing included at concurrency > 1)
    "throughput_tok_s": True,  # output tokens / wall time of the whole workload
    "ttft_p90_s": False,  # 90th percentile time to first token, seconds
    "itl_p99_ms": False,  # 99th percentile inter-token latency, milliseconds
    "peak_memory_gb": False,  # CUDA: peak allocated; CPU: the process's peak resident set during the round
}


def is_speed_metric(metric: str) -> bool:
    return metric in SPEED_METRICS


class SpeedSpec(BaseModel):
    """The workload a speed gate measures: random prompts of `input_len` tokens, exactly `output_len` new tokens
    each, at most `concurrency` in flight, `num_requests` in all; baseline and candidate alternate for `repeats`
    rounds, each a fresh engine after a warm-up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Prompt tokens per request.
    input_len: int = Field(default=128, gt=0)
    # New tokens per request (eos ignored); at least 2, so inter-token latency exists.
    output_len: int = Field(default=32, ge=2)
    # Requests in flight at most (the engine's max_num_seqs).
    concurrency: int = Field(default=1, gt=0)
    # Requests per round.
    num_requests: int = Field(default=4, gt=0)
    # Rounds of (baseline, candidate); the ratio's interval is a t-interval over these paired rounds (>= 2).
    repeats: int = Field(default=5, ge=2)
    # Runtime backend: torch (ModelRunner) or cpp (the C++ kernels; CPU, float32).
    backend: Literal["torch", "cpp"] = "torch"
    # Device the runtime runs on.
    device: Literal["cpu", "cuda"] = "cpu"
    # CPU threads (torch.set_num_threads, or the cpp backend's threads); 0 leaves the default (all cores).
    threads: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _concurrency_fits(self) -> "SpeedSpec":
        if self.concurrency > self.num_requests:
            raise ValueError(f"concurrency {self.concurrency} exceeds num_requests {self.num_requests}: at most num_requests can be in flight; lower concurrency or raise num_requests")
        return self
