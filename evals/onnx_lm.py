"""`LM` over an exported ONNX graph (`export.onnx`, optionally `fuse.onnx_graph`) in onnxruntime, so evals judge
what an ONNX deployment runs: the graph, its QDQ weights as onnxruntime lowers them, its kernels.

`loglikelihood` groups the requests by context (the choices of one question): the context but its last token
runs once (batch 1), its `present` KV arrays are repeated once per choice, and the choices then run as one
right-padded batch of [last context token] + choice[:-1]. The graph's attention is causal and takes no mask,
so right padding is safe: a real token never sees a pad after it, and the pads' logits are never read.
`sequence_nll` (perplexity) runs each passage as one prefill. Tokenization is `HFLM`'s (`PairTokenizer`).

Greedy generation is not offered here: generation tasks and prompt agreement need another backend
(`EvalSpec.unmeasured` names them; recipes and `optforge eval` refuse them with exit 2).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from optforge.evals.lm import GenerateRequest, LoglikelihoodRequest, LoglikelihoodResult, PairTokenizer

ONNX_FILE = "model.onnx"  # what the export.onnx pass writes into an artifact


class OnnxLM(PairTokenizer):
    """`LM` over `runtime.onnx_runner.OnnxCausalLM` and the artifact's tokenizer."""

    def __init__(self, runner, tokenizer, *, max_length: int = 2048, batch_size: int = 16, progress: Callable | None = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.progress = progress
        # Tokens pushed through the graph by the last call, and its seconds.
        self.last_tokens = 0
        self.last_seconds = 0.0

    @classmethod
    def from_path(cls, path: str | Path, *, batch_size: int = 16, progress: Callable | None = None, **runner_options) -> "OnnxLM":
        """An artifact folder with `model.onnx` (export.onnx); `runner_options` go to `OnnxCausalLM`."""
        from transformers import AutoConfig, AutoTokenizer

        from optforge.runtime.onnx_runner import OnnxCausalLM

        path = Path(path)
        require_onnx(path)
        config = AutoConfig.from_pretrained(path)
        return cls(OnnxCausalLM(path, **runner_options), AutoTokenizer.from_pretrained(path), max_length=getattr(config, "max_position_embeddings", 2048),
                   batch_size=batch_size, progress=progress)

    # -------------------------------------------------------------------------------------- scoring

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[LoglikelihoodResult]:
        started = time.perf_counter()
        self.last_tokens = 0
        pairs, groups = self.encode_requests(requests)
        results: list[LoglikelihoodResult | None] = [None] * len(requests)
        advance = self.progress("loglikelihood", len(requests)) if self.progress else (lambda n=1: None)
        for group in groups:
            for b in range(0, len(group), self.batch_size):
                idx = group[b : b + self.batch_size]
                for i, res in zip(idx, self._score_choices(pairs[idx[0]][0], [pairs[i][1] for i in idx])):
                    results[i] = res
                advance(len(idx))
        self.last_seconds = time.perf_counter() - started
        return results  # type: ignore[return-value]

    def _score_choices(self, ctx: list[int], conts: list[list[int]]) -> list[LoglikelihoodResult]:
        """One context, k continuations: ctx[:-1] once, then k rows of [ctx[-1]] + cont[:-1] over its KV."""
        k, prefix = len(conts), ctx[:-1]
        past = self.runner.empty_past(1)
        if prefix:
            _, past = self.runner.forward(np.array([prefix]), np.arange(len(prefix))[None], past)
        past = [np.repeat(p, k, axis=0) for p in past]  # (k, Hkv, P, D)
        rows = [[ctx[-1]] + cont[:-1] for cont in conts]
        width = max(len(r) for r in rows)
        ids = np.zeros((k, width), dtype=np.int64)
        for row, r in enumerate(rows):
            ids[row, : len(r)] = r
        positions = np.broadcast_to(np.arange(len(prefix), len(prefix) + width), (k, width))
        logits, _ = self.runner.forward(ids, positions, past)  # (k, W, V)
        self.last_tokens += len(prefix) + sum(len(r) for r in rows)
        return [_score(logits[row, : len(cont)], cont) for row, cont in enumerate(conts)]

    def sequence_nll(self, sequences: Sequence[list[int]]) -> list[tuple[float, int]]:
        """Per token sequence: (summed NLL in nats of every token after the first, tokens scored)."""
        started = time.perf_counter()
        out = []
        for ids in sequences:
            if len(ids) < 2:
                out.append((0.0, 0))  # a passage of one token has nothing to score
                continue
            logits, _ = self.runner.forward(np.array([ids]), np.arange(len(ids))[None], self.runner.empty_past(1))
            out.append((-_score(logits[0, :-1], ids[1:]).logprob, len(ids) - 1))
        self.last_tokens = sum(len(ids) for ids in sequences)
        self.last_seconds = time.perf_counter() - started
        return out

    def generate(self, requests: Sequence[GenerateRequest]) -> list[str]:
        raise NotImplementedError("the onnx eval backend scores log-likelihoods only; generation tasks need data.eval.backend hf or runtime")


def require_onnx(path: str | Path) -> None:
    """ArtifactError (exit 2) unless the artifact at `path` holds the graph the onnx backend runs."""
    from optforge.errors import ArtifactError

    if not (Path(path) / ONNX_FILE).is_file():
        raise ArtifactError(f"{path}: no {ONNX_FILE}, so the onnx eval backend has nothing to run; the `export.onnx` pass writes it "
                            "(add it to the recipe's passes, or evaluate with --backend hf or runtime)")


def _score(logits: np.ndarray, cont: list[int]) -> LoglikelihoodResult:
    """logits (L, V) at the positions that predict `cont` (L tokens), log-softmax in float64."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    target = np.asarray(cont)
    picked = logprobs[np.arange(len(cont)), target]
    return LoglikelihoodResult(logprob=float(picked.sum()), is_greedy=bool((logprobs.argmax(-1) == target).all()), num_tokens=len(cont))
