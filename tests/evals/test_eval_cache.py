"""Evaluating the same model twice re-uses the eval cache; task metrics flatten into gate-readable names."""

from __future__ import annotations

from optforge.cache import Cache
from optforge.evaluation import run_evals
from optforge.recipe import EvalSpec, ModelSpec, TaskSpec
from optforge.sources import resolve_source


def test_second_evaluation_comes_from_the_cache(tiny_model_dir, cache_dir, monkeypatch):
    cache = Cache(cache_dir)
    artifact, _ = resolve_source(ModelSpec(source=str(tiny_model_dir)), cache)
    spec = EvalSpec(perplexity=None, tasks=[TaskSpec(name="arc_easy", limit=4), TaskSpec(name="winogrande", limit=3)])
    first, cached = run_evals(artifact, spec, dtype="float32", cache=cache)
    assert not cached
    assert set(first) == {"arc_easy.acc", "arc_easy.acc_norm", "winogrande.acc"}
    assert first["arc_easy.acc"]["n"] == 4 and len(first["arc_easy.acc"]["per_example"]["correct"]) == 4

    import optforge.model_io as loader

    def no_load(*args, **kwargs):
        raise AssertionError("a cached evaluation must not load the model")

    monkeypatch.setattr(loader, "load_model", no_load)
    second, cached = run_evals(artifact, spec, dtype="float32", cache=cache)
    assert cached and second == first
    # A different selection of documents is a different cache entry.
    other = EvalSpec(perplexity=None, tasks=[TaskSpec(name="arc_easy", limit=5)])
    monkeypatch.undo()
    third, cached = run_evals(artifact, other, dtype="float32", cache=cache)
    assert not cached and third["arc_easy.acc"]["n"] == 5
