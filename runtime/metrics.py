"""Prometheus text exposition of the engine's state (written by hand: no client library needed)."""

from __future__ import annotations

from optforge.runtime.async_engine import AsyncEngine

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Cumulative buckets, sum and count; fed with drained samples so memory stays bounded."""

    def __init__(self, name: str, help_text: str):
        self.name, self.help = name, help_text
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total, self.count = 0.0, 0

    def observe_all(self, samples: list[float]) -> None:
        while samples:
            value = samples.pop()
            self.counts[next((i for i, b in enumerate(BUCKETS) if value <= b), len(BUCKETS))] += 1
            self.total += value
            self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, n in zip([*map(str, BUCKETS), "+Inf"], self.counts):
            running += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
        return lines + [f"{self.name}_sum {self.total}", f"{self.name}_count {self.count}"]


_histograms: dict[int, tuple[Histogram, Histogram]] = {}


def render_metrics(engine: AsyncEngine) -> str:
    ttft, itl = _histograms.setdefault(id(engine), (
        Histogram("optforge_time_to_first_token_seconds", "Time from request arrival to its first token."),
        Histogram("optforge_inter_token_latency_seconds", "Time between consecutive tokens of a request."),
    ))
    ttft.observe_all(engine.stats.ttft_s)
    itl.observe_all(engine.stats.itl_s)
    bm, s = engine.engine.block_manager, engine.stats
    gauges = [
        ("optforge_requests_waiting", "gauge", "Requests queued, not yet running.", engine.num_waiting),
        ("optforge_requests_running", "gauge", "Requests being generated.", engine.num_running),
        ("optforge_kv_blocks_used", "gauge", "KV cache blocks held by requests.", bm.num_used_blocks),
        ("optforge_kv_blocks_total", "gauge", "KV cache blocks in all.", bm.num_blocks),
        ("optforge_prefix_cache_hit_rate", "gauge", "Prompt tokens found in the prefix cache / prompt tokens looked up.", bm.prefix_hit_rate),
        ("optforge_requests_total", "counter", "Requests accepted.", s.num_requests),
        ("optforge_requests_finished_total", "counter", "Requests that completed.", s.num_finished),
        ("optforge_requests_aborted_total", "counter", "Requests whose client went away.", s.num_aborted),
        ("optforge_requests_refused_total", "counter", "Requests refused with 429 (queue full).", s.num_refused),
        ("optforge_requests_failed_total", "counter", "Requests ended with an error (their step failed, or the engine stopped).", s.num_failed),
        ("optforge_engine_alive", "gauge", "1 while the engine thread runs; 0 once it has stopped on an error.", int(engine.is_alive)),
        ("optforge_engine_failed_steps_total", "counter", "Steps whose runner raised (their requests were then run one by one).", engine.engine.num_failed_steps),
        ("optforge_generation_tokens_total", "counter", "Tokens generated.", s.num_generated_tokens),
        ("optforge_preemptions_total", "counter", "Sequences preempted (recomputed later) for lack of KV blocks.", engine.engine.scheduler.num_preemptions),
    ]
    lines = []
    for name, kind, help_text, value in gauges:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines + ttft.render() + itl.render()) + "\n"
