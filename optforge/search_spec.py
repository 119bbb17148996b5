"""The `search:` section of a recipe: which candidate pipelines to build, what every one must pass, what to pick.

    search:
      steps:                       # the candidates are every combination of one choice per step, in order
        quant:
          - quant.fp8
          - quant.int8_weight_only
          - {name: quant.rtn, config: {bits: 4}, grid: {group_size: [64, 128]}}   # one candidate per value
        prune: [null, {name: prune.mlp_width, config: {keep: 0.9}}]              # null: the step is skipped
      gates:                       # every chosen candidate must pass all of them, against the source model
        - {metric: perplexity, max_increase_pct: 3}
        - {metric: arc_easy, max_drop: 2}
        - {metric: decode_tok_s, min_speedup: 1.3}
      objective: weight_bytes      # or a speed metric of the gates, or weights: {weight_bytes: 1, decode_tok_s: 1}
      fallback: {for: [quant.rtn], max_layers: 8}   # int4 candidates that fail retry with their most sensitive layers at INT8

Kept apart from `optforge.recipe` so that file stays small; of optforge it imports only `optforge.recipe_speed`.
"""

from __future__ import annotations

import itertools
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from optforge.recipe_speed import SPEED_METRICS, is_speed_metric

# The objective's terms besides speed metrics: the artifact's weight bytes (smaller is better).
SIZE_OBJECTIVES = ("weight_bytes",)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Choice(_Strict):
    # Registered pass name (`optforge passes` lists them).
    name: str
    config: dict[str, Any] = Field(default_factory=dict)
    # Config values to try: one candidate per combination of values (e.g. {group_size: [64, 128]}).
    grid: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("grid")
    @classmethod
    def _grid_lists(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [k for k, values in grid.items() if not values]
        if empty:
            raise ValueError(f"grid values of {', '.join(empty)} are empty; give at least one value each")
        return grid

    def expand(self) -> list[dict]:
        """One pass spec {name, config} per combination of the grid's values."""
        keys = list(self.grid)
        return [{"name": self.name, "config": {**self.config, **dict(zip(keys, values))}} for values in itertools.product(*(self.grid[k] for k in keys))]


class Fallback(_Strict):
    """Per-layer precision for weight-only candidates that fail: the decoder layers most sensitive to their grid
    (optforge.sensitivity) move to INT8 per channel (the pass's `int8_layers`), 1, 2, 4, ... of them, until the
    gates pass or `max_layers` is reached. One artifact, one compressed-tensors checkpoint with two grids."""

    # The weight-only passes that get fallback candidates.
    for_: list[str] = Field(default_factory=lambda: ["quant.rtn", "quant.awq", "quant.gptq"], alias="for")
    # Decoder layers kept at INT8, at most.
    max_layers: int = Field(default=8, gt=0)
    # Calibration rows (from data.calibration) that score each layer's sensitivity.
    rows: int = Field(default=8, gt=0)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SearchSpec(_Strict):
    # Step name -> the choices for that step, in the order the steps run; null skips the step.
    steps: dict[str, list[Choice | str | None]]
    # Constraints: gate specs (as a pass's `gate`), each judged for every candidate against the source model.
    gates: list[dict[str, Any]]
    # What to pick among the candidates that pass: `weight_bytes` (smallest), a speed metric the gates measure
    # (largest speedup), or weights over them: the pick maximizes sum(w * log(benefit)), where benefit is the
    # source's bytes / the candidate's bytes, or the speedup.
    objective: str | dict[str, float] = "weight_bytes"
    # Judge each candidate's quality on growing prefixes of the eval items and stop once decided (optforge.sequential).
    sequential: bool = True
    # Evaluate every candidate (for the report), or stop at candidates the objective says cannot win.
    exhaustive: bool = False
    fallback: Fallback | None = None

    @field_validator("steps")
    @classmethod
    def _steps_have_choices(cls, steps: dict) -> dict:
        if not steps or any(not choices for choices in steps.values()):
            raise ValueError("search.steps needs at least one step, each with at least one choice (null skips the step)")
        return steps

    @model_validator(mode="after")
    def _objective_is_measured(self) -> "SearchSpec":
        measured = {g.get("metric") for g in self.gates}
        for term in self.objective_weights():
            if term in SIZE_OBJECTIVES:
                continue
            if not is_speed_metric(term):
                raise ValueError(f"search.objective names '{term}', which is neither weight_bytes nor a speed metric ({', '.join(SPEED_METRICS)})")
            if term not in measured:
                raise ValueError(f"search.objective names '{term}', but no search gate measures it; add a gate such as {{metric: {term}, min_speedup: 1.0}}")
        return self

    def objective_weights(self) -> dict[str, float]:
        return {self.objective: 1.0} if isinstance(self.objective, str) else dict(self.objective)

    def candidates(self) -> list[list[dict]]:
        """Every candidate pipeline as a list of pass specs {name, config}, in step order."""
        per_step = []
        for choices in self.steps.values():
            options: list[list[dict]] = []
            for choice in choices:
                if choice is None:
                    options.append([])
                else:
                    options += [[spec] for spec in (Choice(name=choice) if isinstance(choice, str) else choice).expand()]
            per_step.append(options)
        return [[spec for part in combo for spec in part] for combo in itertools.product(*per_step)]
