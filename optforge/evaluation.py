"""Run a recipe's evals on a model directory, with results cached by (model digest, eval config)."""

from __future__ import annotations

import logging
from typing import Callable

from optforge.artifact import ModelArtifact
from optforge.cache import Cache
from optforge.hashing import sha256_json
from optforge.recipe import EvalSpec

log = logging.getLogger(__name__)


def run_evals(artifact: ModelArtifact, spec: EvalSpec, *, dtype: str, cache: Cache, device: str = "cpu", progress: Callable | None = None) -> tuple[dict[str, dict], bool]:
    """Return ({metric: result dict}, cached) for the enabled evals of `spec`."""
    from optforge.evals.perplexity import EVAL_VERSION

    results: dict[str, dict] = {}
    all_cached = True
    if spec.perplexity is not None:
        key = sha256_json({"model": artifact.digest, "eval": spec.perplexity.model_dump(), "dtype": dtype, "v": EVAL_VERSION})
        hit = cache.get_json("evals", key)
        if hit is None:
            all_cached = False
            hit = _perplexity(artifact, spec, dtype, device, progress)
            cache.put_json("evals", key, hit)
        results["perplexity"] = hit
    return results, all_cached


def _perplexity(artifact: ModelArtifact, spec: EvalSpec, dtype: str, device: str, progress) -> dict:
    from optforge.evals.datasets import load_texts
    from optforge.evals.perplexity import perplexity
    from optforge.runtime.loader import load_model

    ppl = spec.perplexity
    model, tokenizer = load_model(artifact.path, dtype=dtype, device=device)
    texts = load_texts(ppl)
    result = perplexity(model, tokenizer, texts, max_length=ppl.max_length, batch_size=ppl.batch_size, progress=progress)
    out = result.to_dict()
    out["rows"] = {"dataset": ppl.dataset, "split": ppl.split, "rows": list(ppl.rows)}
    log.info("perplexity %.4f on %d passages (%d tokens, %.1fs)", result.value, out["n"], out["tokens"], result.seconds)
    return out
