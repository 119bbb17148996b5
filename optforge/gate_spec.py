"""A quality or speed gate as a recipe writes it (`passes[i].gate`, `search.gates`): the metric, one threshold,
the confidence, what undecided does, the baseline and whether it judges in looks. Judged by `optforge.gate` and
`optforge.speed`; kept apart from `optforge.recipe` so that file stays small (the recipe re-exports it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from optforge.recipe_speed import is_speed_metric


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GateSpec(_Strict):
    # Metric the gate reads: `perplexity`, `<task>.acc`, `<task>.acc_norm`, `<task>.exact_match`, or `<task>`
    # (its acc_norm where defined, else acc, else exact_match). The task must be listed under data.eval.tasks.
    # `prompts.exact_match` reads the agreement with the source on data.eval.prompts (e.g. max_drop: 10 lets
    # at most 10 points of the prompts change their greedy output, at the gate's confidence).
    metric: str
    # Largest allowed increase of a lower-is-better metric (perplexity), in percent of the baseline.
    max_increase_pct: float | None = Field(default=None, ge=0)
    # Largest allowed drop of a higher-is-better metric (accuracy), in absolute points (1 point = 0.01).
    max_drop: float | None = Field(default=None, ge=0)
    # Largest allowed drop of a higher-is-better metric, in percent of the baseline.
    max_drop_pct: float | None = Field(default=None, ge=0)
    # Speed metrics (decode_tok_s, ttft_p90_s, ... see optforge.recipe_speed): the smallest speedup a pass must
    # show over its baseline (1.2: 20% faster) or the largest slowdown it may show (1.05: at most 5% slower);
    # a speedup is oriented so > 1 is better, for higher- and lower-is-better metrics alike.
    min_speedup: float | None = Field(default=None, gt=0)
    max_slowdown: float | None = Field(default=None, ge=1)
    # Two-sided confidence of the interval on the paired difference; the gate passes only when the whole
    # interval is within the threshold and fails only when the whole interval is beyond it.
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    # What an undecided gate (too few items to tell either way) does to the build.
    on_undecided: Literal["pass", "fail"] = "fail"
    # What the gate compares against: the model before this pass, or the source model.
    baseline: Literal["previous", "source"] = "previous"
    # Judge on growing prefixes of the eval items (1/8, 1/4, 1/2, all) and stop once every gate of the pass
    # passes or one fails, with alpha spent across the looks (optforge.sequential): clear cases cost few items.
    # Quality gates only; a pass's quality gates are judged in looks when any of them asks.
    sequential: bool = False

    @model_validator(mode="after")
    def _one_threshold(self) -> "GateSpec":
        given = [k for k in ("max_increase_pct", "max_drop", "max_drop_pct", "min_speedup", "max_slowdown") if getattr(self, k) is not None]
        if is_speed_metric(self.metric):
            if given not in (["min_speedup"], ["max_slowdown"]):
                raise ValueError(f"speed metric '{self.metric}' needs exactly one threshold: min_speedup (e.g. 1.2) or max_slowdown (e.g. 1.05); found {', '.join(given) or 'none'}")
            return self
        if set(given) & {"min_speedup", "max_slowdown"}:
            raise ValueError(f"'{self.metric}' is a quality metric: min_speedup and max_slowdown apply to speed metrics only")
        if len(given) != 1:
            found = f"found {', '.join(given)}" if given else "found none"
            raise ValueError(f"a gate needs exactly one threshold: max_increase_pct (perplexity), max_drop (points) or max_drop_pct ({found})")
        if self.metric == "perplexity" and self.max_increase_pct is None:
            raise ValueError("perplexity is lower-is-better: give its threshold as max_increase_pct")
        if self.metric != "perplexity" and self.max_increase_pct is not None:
            raise ValueError(f"'{self.metric}' is higher-is-better: give its threshold as max_drop (points) or max_drop_pct")
        return self
