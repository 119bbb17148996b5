"""`LM` over the serving runtime, so evals judge what `optforge serve` runs: its paged KV cache, its runner
(torch `ModelRunner` or the C++ `StepRunner`), the artifact's quantized modules and kernels as they load there.

`loglikelihood` sends each (context, continuation) as one request whose prompt is context + continuation,
with `SamplingParams(prompt_logprobs_from=len(context), max_tokens=1)`: the runner keeps the logits of the
positions that predict the continuation's tokens (only those rows reach the vocabulary projection) and
records their log-softmax at the prompt's own next tokens. The one token sampled after the prompt is thrown
away. Requests go through the engine's continuous batching in waves: the first choice of each question of a
wave runs first, then its other choices with the next wave's first choices, so those find the question's
context in the prefix cache (whole KV blocks before the scored position) instead of computing it again.

`sequence_nll` (perplexity, evals/perplexity.py `lm_perplexity`) sends each passage as one request with
`prompt_logprobs_from=1`: every token after the first is scored given the ones before it.

`generate` is the engine's greedy decoding with stop strings, all requests at once. Tokenization is the same
as `HFLM`'s (`PairTokenizer`), so both score the same token ids.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Callable, Sequence

from optforge.evals.lm import GenerateRequest, LoglikelihoodRequest, LoglikelihoodResult, PairTokenizer

_request_ids = itertools.count()


class RuntimeLM(PairTokenizer):
    """`LM` over a runtime `Engine` (runtime/llm.py) that this object alone sends requests to."""

    def __init__(self, engine, *, wave_size: int | None = None, progress: Callable | None = None):
        """`wave_size`: questions whose first choice runs before their other choices (default: max_num_seqs)."""
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_length = engine.max_context - 1  # one token is sampled after every prompt
        self.wave_size = wave_size or engine.config.max_num_seqs
        self.progress = progress
        # Tokens the runner computed for the last call (prefix-cache hits excluded), and its seconds.
        self.last_tokens = 0
        self.last_seconds = 0.0

    @classmethod
    def from_path(cls, path: str | Path, *, dtype: str = "float32", device: str = "cpu", backend: str = "torch", progress: Callable | None = None,
                  **engine_options) -> "RuntimeLM":
        """Load a resolved model folder or artifact as `optforge serve` loads it (`LLM.from_resolved`);
        `engine_options`: other `EngineConfig` fields (serve's defaults otherwise)."""
        from optforge.runtime.llm import LLM, EngineConfig

        llm = LLM.from_resolved(path, EngineConfig(dtype=dtype, device=device, backend=backend, **engine_options))
        return cls(llm.engine, progress=progress)

    # -------------------------------------------------------------------------------------- scoring

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[LoglikelihoodResult]:
        started = time.perf_counter()
        self.last_tokens = 0
        pairs, members = self.encode_requests(requests)
        waves = [members[w : w + self.wave_size] for w in range(0, len(members), self.wave_size)]
        results: list[LoglikelihoodResult | None] = [None] * len(requests)
        advance = self.progress("loglikelihood", len(requests)) if self.progress else (lambda n=1: None)
        followers: list[int] = []
        for wave in waves + [[]]:
            phase = followers + [group[0] for group in wave]
            if phase:
                for i, res in zip(phase, self._score(pairs, phase)):
                    results[i] = res
                advance(len(phase))
            followers = [i for group in wave for i in group[1:]]
        self.last_seconds = time.perf_counter() - started
        return results  # type: ignore[return-value]

    def _score(self, pairs: list[tuple[list[int], list[int]]], indices: list[int]) -> list[LoglikelihoodResult]:
        from optforge.runtime.sequence import SamplingParams

        seqs = []
        for i in indices:
            ctx, cont = pairs[i]
            params = SamplingParams(max_tokens=1, ignore_eos=True, prompt_logprobs_from=len(ctx))
            seqs.append(self.engine.add_request(f"loglikelihood-{next(_request_ids)}", ctx + cont, params))
        self._run_to_completion()
        out = []
        for i, seq in zip(indices, seqs):
            ctx, cont = pairs[i]
            scored = [seq.prompt_logprobs[pos] for pos in range(len(ctx), len(ctx) + len(cont))]
            out.append(LoglikelihoodResult(logprob=sum(lp for lp, _ in scored), is_greedy=all(top for _, top in scored), num_tokens=len(cont)))
            self.last_tokens += seq.num_prompt_tokens - seq.num_cached_tokens
        return out

    def sequence_nll(self, sequences: Sequence[list[int]]) -> list[tuple[float, int]]:
        """Per token sequence: (summed NLL in nats of every token after the first, tokens scored)."""
        from optforge.runtime.sequence import SamplingParams

        started = time.perf_counter()
        too_long = max((len(ids) for ids in sequences), default=0)
        if too_long > self.max_length:
            from optforge.errors import DataError

            raise DataError(f"a {too_long}-token passage does not fit the runtime's context of {self.max_length + 1} tokens; lower data.eval.perplexity.max_length")
        params = SamplingParams(max_tokens=1, ignore_eos=True, prompt_logprobs_from=1)
        seqs = {i: self.engine.add_request(f"perplexity-{next(_request_ids)}", ids, params) for i, ids in enumerate(sequences) if len(ids) >= 2}
        self._run_to_completion()
        out = [(0.0, 0)] * len(sequences)  # a passage of one token has nothing to score
        for i, seq in seqs.items():
            out[i] = (-sum(lp for lp, _ in (seq.prompt_logprobs[pos] for pos in range(1, len(sequences[i])))), len(sequences[i]) - 1)
        self.last_tokens = sum(seq.num_prompt_tokens - seq.num_cached_tokens for seq in seqs.values())
        self.last_seconds = time.perf_counter() - started
        return out

    def _run_to_completion(self) -> None:
        while self.engine.has_unfinished:
            self.engine.step()
        failed = self.engine.take_failed()
        if failed:
            raise RuntimeError(f"the runtime failed {len(failed)} eval request(s): {failed[0].error}")

    # ----------------------------------------------------------------------------------- generation

    def generate(self, requests: Sequence[GenerateRequest]) -> list[str]:
        """Greedy continuation of each prompt, cut at the first stop string (decoding ends once one appears)."""
        seqs = self._greedy([self._prompt(r.prompt) for r in requests], [r.max_new_tokens for r in requests], [tuple(r.stop) for r in requests])
        return [self.engine.output(seq).text for seq in seqs]

    def greedy_tokens(self, prompt: list[int], max_new_tokens: int, *, stop: Sequence[str] = ()) -> list[int]:
        """As `HFLM.greedy_tokens`: the greedy continuation's ids (EOS included when the model emits it)."""
        (seq,) = self._greedy([prompt or [self.tokenizer.eos_token_id]], [max_new_tokens], [tuple(stop)])
        return list(seq.output_token_ids)

    def _prompt(self, text: str) -> list[int]:
        return self._bos + self._encode(text) or [self.tokenizer.eos_token_id]

    def _greedy(self, prompts: list[list[int]], budgets: list[int], stops: list[tuple[str, ...]]):
        from optforge.runtime.sequence import SamplingParams

        started = time.perf_counter()
        seqs = [self.engine.add_request(f"generate-{next(_request_ids)}", p, SamplingParams(max_tokens=n, stop=s)) for p, n, s in zip(prompts, budgets, stops)]
        self._run_to_completion()
        self.last_tokens = sum(len(seq) for seq in seqs)
        self.last_seconds = time.perf_counter() - started
        return seqs
