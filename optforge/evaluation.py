"""Run a recipe's evals on a model directory, with results cached by (model digest, eval config).

Results are a dict {metric name: result dict}. Every result has `value`, `n`, `seconds` and `per_example`
(what paired gates compare; stripped from the manifest, kept in the cache). Metric names: `perplexity`, and
per task `<task>.acc` and `<task>.acc_norm` (where the task defines it), or `<task>.exact_match` for generation
tasks (triviaqa, nq_open, basic_arithmetic); every per-task metric carries 0/1 `per_example["correct"]`. With
`data.eval.prompts`: `prompts.exact_match` (0/1 per prompt, gateable) and `prompts.match_tokens`. Every result
names the `backend` that measured it: `data.eval.backend` (hf, runtime, cpp or onnx), with `auto` resolved per
model (evals/backends.py: the runtime where it runs the model, else hf). Perplexity, tasks and prompts all
go through that backend.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from optforge.artifact import ModelArtifact
from optforge.cache import Cache
from optforge.errors import DataError
from optforge.hashing import sha256_json
from optforge.recipe import EvalSpec, PromptsSpec, TaskSpec

log = logging.getLogger(__name__)


def metric_summaries(metrics: dict) -> dict:
    """Metric results without their per-example arrays (those stay in the eval cache): what manifests and
    reports hold."""
    return {name: {k: v for k, v in result.items() if k != "per_example"} for name, result in metrics.items()}


class _LazyModel:
    """Loads the model on first use, so a run answered entirely from the cache never loads it."""

    def __init__(self, artifact: ModelArtifact, dtype: str, device: str):
        self.artifact, self.dtype, self.device = artifact, dtype, device
        self._loaded = None
        self._runtime = None  # a RuntimeLM, loaded by the serving runtime (backend runtime or cpp)
        self._onnx = None  # an OnnxLM over the artifact's model.onnx (backend onnx)

    def lm(self, backend: str, *, batch_size: int = 16, progress: Callable | None = None):
        """The eval `LM` of `backend`: an HFLM over the HF modules, a RuntimeLM as `optforge serve` loads it, or
        an OnnxLM over the exported graph."""
        if backend == "hf":
            from optforge.evals.lm import HFLM

            loaded, tokenizer = self.get()
            return HFLM(loaded, tokenizer, batch_size=batch_size, progress=progress)
        if backend == "onnx":
            if self._onnx is None:
                from optforge.evals.onnx_lm import OnnxLM

                self._onnx = OnnxLM.from_path(self.artifact.path)
            self._onnx.batch_size, self._onnx.progress = batch_size, progress
            return self._onnx
        if self._runtime is None:
            from optforge.evals.runtime_lm import RuntimeLM

            runner = {"runtime": "torch", "cpp": "cpp"}[backend]
            self._runtime = RuntimeLM.from_path(self.artifact.path, dtype=self.dtype, device=self.device, backend=runner)
        self._runtime.progress = progress
        return self._runtime

    def get(self):
        if self._loaded is None:
            from optforge.model_io import load_model

            self._loaded = load_model(self.artifact.path, dtype=self.dtype, device=self.device)
        return self._loaded


def run_evals(artifact: ModelArtifact, spec: EvalSpec, *, dtype: str, cache: Cache, device: str = "cpu", progress: Callable | None = None) -> tuple[dict[str, dict], bool]:
    """Return ({metric: result dict}, cached) for the enabled evals of `spec`, each measured by its backend
    (`auto` resolved for this artifact)."""
    from optforge.evals.backends import resolve_backend
    from optforge.evals.perplexity import EVAL_VERSION

    backend = resolve_backend(spec.backend, artifact.path)
    unmeasured = spec.unmeasured(backend)
    if unmeasured:
        raise DataError(unmeasured[0][1])
    if backend == "onnx":
        from optforge.evals.onnx_lm import require_onnx

        require_onnx(artifact.path)
    results: dict[str, dict] = {}
    all_cached = True
    model = _LazyModel(artifact, dtype, device)
    if spec.perplexity is not None:
        key = sha256_json({"model": artifact.digest, "eval": spec.perplexity.model_dump(), "dtype": dtype, "v": EVAL_VERSION, **_backend_key(backend)})
        hit = cache.get_json("evals", key)
        if hit is None:
            all_cached = False
            hit = _perplexity(model, spec, backend, progress)
            cache.put_json("evals", key, hit)
        results["perplexity"] = {**hit, "backend": backend}
    for task in spec.tasks:
        task_result, cached = run_task(artifact, task, dtype=dtype, cache=cache, model=model, progress=progress, backend=backend)
        all_cached = all_cached and cached
        results.update(task_metrics(task_result))
    if spec.prompts is not None:
        agreement_metrics, cached = run_prompt_agreement(artifact, spec.prompts, dtype=dtype, cache=cache, model=model, device=device, backend=backend)
        all_cached = all_cached and cached
        results.update(agreement_metrics)
    return results, all_cached


def _backend_key(backend: str) -> dict:
    """The backend's part of an eval cache key: nothing for hf, so results cached before backends existed hold."""
    return {} if backend == "hf" else {"backend": backend}


def task_cache_key(artifact: ModelArtifact, task: TaskSpec, dtype: str, backend: str = "hf") -> str:
    from optforge.evals.tasks import get_task, task_docs, task_version

    definition = get_task(task.name)
    docs, first = task_docs(definition, task.rows, task.limit)
    # batch_size changes only speed, so it stays out of the key; the rows actually scored go in.
    return sha256_json({"model": artifact.digest, "task": task.name, "rows": [first, first + len(docs)], "dtype": dtype, "v": task_version(definition), **_backend_key(backend)})


def run_task(artifact: ModelArtifact, task: TaskSpec, *, dtype: str, cache: Cache, model: _LazyModel | None = None, device: str = "cpu",
             progress: Callable | None = None, backend: str = "hf") -> tuple[dict, bool]:
    """One task's TaskResult as a dict (with the `backend` that scored it), from the cache when this model,
    rows and backend were scored before."""
    key = task_cache_key(artifact, task, dtype, backend)
    hit = cache.get_json("evals", key)
    if hit is not None:
        log.info("%s: cached (%s)", task.name, key[:12])
        return {**hit, "backend": backend}, True
    from optforge.evals.tasks import evaluate_task

    lm = (model or _LazyModel(artifact, dtype, device)).lm(backend, batch_size=task.batch_size, progress=progress)
    result = evaluate_task(lm, task.name, limit=task.limit, rows=task.rows)
    out = {**result.to_dict(), "backend": backend}
    cache.put_json("evals", key, out)
    summary = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if not k.endswith("_stderr"))
    log.info("%s: %s on %d documents (%.1fs, %.0f tok/s)", task.name, summary, result.n, result.seconds, result.tokens_per_s or 0.0)
    return out, False


def task_metrics(result: dict) -> dict[str, dict]:
    """Flatten a TaskResult dict into gate-readable metrics `<task>.<metric>`."""
    field = {"acc": "correct", "acc_norm": "acc_norm", "exact_match": "correct"}
    out = {}
    for metric, value in result["metrics"].items():
        if metric.endswith("_stderr"):
            continue
        out[f"{result['task']}.{metric}"] = {
            "metric": f"{result['task']}.{metric}",
            "value": value,
            "stderr": result["metrics"].get(f"{metric}_stderr"),
            "n": result["n"],
            "seconds": result["seconds"],
            "tokens_per_s": result.get("tokens_per_s"),
            "rows": result["config"]["rows"],
            "backend": result.get("backend", "hf"),
            "per_example": {"correct": [ex[field[metric]] for ex in result["per_example"]]},
        }
    return out


def run_prompt_agreement(artifact: ModelArtifact, prompts: PromptsSpec, *, dtype: str, cache: Cache, model: _LazyModel | None = None, device: str = "cpu",
                         backend: str = "hf") -> tuple[dict[str, dict], bool]:
    """`prompts.exact_match` and `prompts.match_tokens` of `artifact` against the reference model's greedy
    outputs on the prompts file (see evals/agreement.py), both decoded by `backend`; both are cached."""
    from optforge.evals.agreement import agreement, file_sha256
    from optforge.evals.tasks import mean_stderr
    from optforge.sources import resolve_source

    if prompts.reference is None:
        raise DataError("data.eval.prompts has no reference model; a recipe fills in its model.source, a Python caller sets PromptsSpec.reference")
    reference, _ = resolve_source(prompts.reference, cache)
    sha = file_sha256(prompts.path)
    same = reference.digest == artifact.digest
    ref, ref_cached = _greedy_outputs(reference, prompts, sha, dtype=dtype, cache=cache, model=model if same else None, device=device, backend=backend)
    out, cached = (ref, ref_cached) if same else _greedy_outputs(artifact, prompts, sha, dtype=dtype, cache=cache, model=model, device=device, backend=backend)
    exact, matched = agreement(ref["tokens"], out["tokens"])
    common = {"n": len(exact), "seconds": out["seconds"], "tokens_per_s": None, "reference": reference.digest, "prompts_sha256": sha, "max_tokens": prompts.max_tokens, "backend": backend}
    value, stderr = mean_stderr(exact)
    mean_match, match_stderr = mean_stderr(matched)
    log.info("prompts: %d of %d greedy outputs equal the reference's (%.1f tokens agree on average)", sum(exact), len(exact), mean_match)
    return {
        "prompts.exact_match": {"metric": "prompts.exact_match", "value": value, "stderr": stderr, **common, "per_example": {"correct": exact}},
        "prompts.match_tokens": {"metric": "prompts.match_tokens", "value": mean_match, "stderr": match_stderr, **common, "per_example": {"match_tokens": matched}},
    }, ref_cached and cached


def _greedy_outputs(artifact: ModelArtifact, prompts: PromptsSpec, sha: str, *, dtype: str, cache: Cache, model: _LazyModel | None, device: str,
                    backend: str = "hf") -> tuple[dict, bool]:
    """{"tokens": [[int]], "seconds": float}: the model's greedy outputs on the prompts, from the cache when
    this model, prompts file and budget were run before."""
    from optforge.evals.agreement import AGREEMENT_VERSION, greedy_outputs, read_prompts

    key = sha256_json({"greedy": artifact.digest, "prompts": sha, "max_tokens": prompts.max_tokens, "dtype": dtype, "v": AGREEMENT_VERSION, **_backend_key(backend)})
    hit = cache.get_json("evals", key)
    if hit is not None:
        return hit, True
    lm = (model or _LazyModel(artifact, dtype, device)).lm(backend)
    started = time.perf_counter()
    tokens = greedy_outputs(lm, read_prompts(prompts.path), prompts.max_tokens)
    out = {"tokens": tokens, "seconds": time.perf_counter() - started}
    cache.put_json("evals", key, out)
    return out, False


def _perplexity(model: _LazyModel, spec: EvalSpec, backend: str, progress) -> dict:
    """Perplexity by `backend`: HF's padded batches, or the same passages scored through the backend's LM."""
    from optforge.evals.datasets import load_texts
    from optforge.evals.perplexity import lm_perplexity, perplexity

    ppl = spec.perplexity
    texts = load_texts(ppl)
    if backend == "hf":
        loaded, tokenizer = model.get()
        result = perplexity(loaded, tokenizer, texts, max_length=ppl.max_length, batch_size=ppl.batch_size, progress=progress)
    else:
        result = lm_perplexity(model.lm(backend, batch_size=ppl.batch_size), texts, max_length=ppl.max_length, progress=progress)
    out = result.to_dict()
    out["rows"] = {"dataset": ppl.dataset, "split": ppl.split, "rows": list(ppl.rows)}
    log.info("perplexity %.4f on %d passages (%d tokens, %.1fs, %s)", result.value, out["n"], out["tokens"], result.seconds, backend)
    return out
