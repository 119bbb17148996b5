"""The `search:` section (optforge/search_spec.py): candidates are every combination of one choice per step
(grids expanded, null skipping a step), and an objective must name something the search measures."""

import pytest
from pydantic import ValidationError

from optforge.search_spec import SearchSpec

GATES = [{"metric": "perplexity", "max_increase_pct": 3}, {"metric": "decode_tok_s", "min_speedup": 1.3}]


def test_candidates_are_the_product_of_the_steps_with_grids_expanded():
    spec = SearchSpec(steps={"quant": ["quant.fp8", {"name": "quant.rtn", "config": {"bits": 4}, "grid": {"group_size": [64, 128]}}],
                             "prune": [None, {"name": "prune.mlp_width", "config": {"keep": 0.9}}]}, gates=GATES)
    names = [[(p["name"], p["config"].get("group_size")) for p in c] for c in spec.candidates()]
    assert len(names) == 6
    assert names[0] == [("quant.fp8", None)] and names[1] == [("quant.fp8", None), ("prune.mlp_width", None)]
    assert [("quant.rtn", 128), ("prune.mlp_width", None)] in names
    assert spec.objective_weights() == {"weight_bytes": 1.0} and spec.sequential and spec.fallback is None


@pytest.mark.parametrize("objective, message", [("itl_p99_ms", "no search gate measures it"), ("arc_easy", "neither weight_bytes nor a speed metric"),
                                                 ({"weight_bytes": 1, "ttft_p90_s": 1}, "no search gate measures it")])
def test_an_objective_must_be_measured(objective, message):
    with pytest.raises(ValidationError, match=message):
        SearchSpec(steps={"quant": ["quant.fp8"]}, gates=GATES, objective=objective)
    SearchSpec(steps={"quant": ["quant.fp8"]}, gates=GATES, objective={"weight_bytes": 1, "decode_tok_s": 2})


def test_steps_need_choices_and_grids_need_values():
    with pytest.raises(ValidationError, match="at least one choice"):
        SearchSpec(steps={"quant": []}, gates=GATES)
    with pytest.raises(ValidationError, match="group_size are empty"):
        SearchSpec(steps={"quant": [{"name": "quant.rtn", "grid": {"group_size": []}}]}, gates=GATES)
