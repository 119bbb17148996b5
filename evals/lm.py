"""The language-model interface the evaluator talks to, and its implementation for Hugging Face models.

`LM` is a protocol with two calls, after lm-evaluation-harness's: `loglikelihood` scores a continuation given
a context; `generate` continues a prompt greedily. `HFLM` implements it for any HF causal LM (and so for any
optforge artifact through `load_lm`); `RuntimeLM` (evals/runtime_lm.py) implements it over the serving
runtime, so a gate can evaluate exactly what will be served.

Tokenization follows lm-eval: spaces at the end of a context move to the start of the continuation, and the
continuation's tokens are those of tokenize(context + continuation) past tokenize(context), so merges across
the boundary tokenize as they would in running text. An empty context is replaced by the EOS token.

Efficiency: requests that share a context (the choices of one question) have the context scored ONCE: a
batch of contexts runs as one forward pass, its KV cache is repeated across each context's choices, and the
choices then run as one batch over only their own tokens. Requests whose context is unique (Winogrande) are
batched whole. Batches are sorted by length so they pad little.
"""

from __future__ import annotations

import functools

import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoglikelihoodRequest:
    context: str
    continuation: str


@dataclass(frozen=True)
class LoglikelihoodResult:
    # Summed log-probability (nats) of the continuation's tokens given the context.
    logprob: float
    # Whether greedy decoding from the context would produce exactly the continuation.
    is_greedy: bool
    # Number of continuation tokens scored.
    num_tokens: int


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    # Generation stops at this many new tokens or at the first stop string, whichever comes first.
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()


class LM(Protocol):
    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[LoglikelihoodResult]: ...

    def generate(self, requests: Sequence[GenerateRequest]) -> list[str]: ...


class PairTokenizer:
    """The tokenization every `LM` here shares (see the module docstring), so two LMs over the same tokenizer
    score the same token ids. Subclasses set `tokenizer` and `max_length`."""

    tokenizer: object
    # Longest sequence scored; longer context + continuation pairs lose tokens from the left of the context.
    max_length: int

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        bos = self._bos
        if not context:
            return bos or [self.tokenizer.eos_token_id], self._encode(continuation)
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        if whole[: len(ctx)] != ctx:  # a merge across the boundary changed the context's tokens
            return bos + ctx, self._encode(continuation)
        return bos + ctx, whole[len(ctx) :]

    def encode_requests(self, requests: Sequence[LoglikelihoodRequest]) -> tuple[list[tuple[list[int], list[int]]], list[list[int]]]:
        """Each request's (context, continuation) ids, truncated to max_length, and the request indices grouped
        by identical context (what KV or prefix reuse shares)."""
        pairs = [self._truncate(*self.encode_pair(r.context, r.continuation)) for r in requests]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            groups.setdefault(tuple(ctx), []).append(i)
        return pairs, list(groups.values())

    @functools.cached_property
    def _bos(self) -> list[int]:
        """BOS first, as the model saw in training, for tokenizers that add it (Gemma); [] otherwise (SmolLM2)."""
        from optforge.evals.perplexity import leading_bos

        return leading_bos(self.tokenizer)

    def _truncate(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        if not cont:
            raise ValueError("a loglikelihood request needs a non-empty continuation")
        cont = cont[-self.max_length :]
        keep = self.max_length - len(cont) + 1  # the last context token predicts the first continuation token
        return ctx[-keep:], cont


class HFLM(PairTokenizer):
    """`LM` over a Hugging Face causal LM and its tokenizer (any object with `encode`/`decode`)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int | None = None, kv_reuse: bool = True, progress: Callable | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)
        self.kv_reuse = kv_reuse
        self.progress = progress
        # Tokens pushed through the model by the last loglikelihood call, and the seconds it took.
        self.last_tokens = 0
        self.last_seconds = 0.0

    @property
    def device(self):
        return next(self.model.parameters()).device

    # -------------------------------------------------------------------------------------- scoring

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[LoglikelihoodResult]:
        import torch

        started = time.perf_counter()
        self.last_tokens = 0
        pairs, groups = self.encode_requests(requests)
        shared = [idx for idx in groups if self.kv_reuse and len(idx) > 1]
        single = [i for idx in groups if not (self.kv_reuse and len(idx) > 1) for i in idx]
        results: list[LoglikelihoodResult | None] = [None] * len(requests)
        advance = self.progress("loglikelihood", len(requests)) if self.progress else (lambda n=1: None)
        with torch.inference_mode():
            for batch in self._shared_batches(shared, pairs):
                scored = self._score_shared([[pairs[i] for i in idx] for idx in batch])
                for i, res in zip([i for idx in batch for i in idx], scored):
                    results[i] = res
                advance(sum(len(idx) for idx in batch))
            single.sort(key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
            for b in range(0, len(single), self.batch_size):
                idx = single[b : b + self.batch_size]
                for i, res in zip(idx, self._score_whole([pairs[i] for i in idx])):
                    results[i] = res
                advance(len(idx))
        self.last_seconds = time.perf_counter() - started
        return results  # type: ignore[return-value]

    def _score_whole(self, pairs: list[tuple[list[int], list[int]]]) -> list[LoglikelihoodResult]:
        """One batch of full sequences, right-padded: (B, T) -> log-probs of each continuation."""
        import torch

        seqs = [ctx + cont for ctx, cont in pairs]
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits  # (B, T, V)
        self.last_tokens += int(mask.sum())
        out = []
        for row, (ctx, cont) in enumerate(pairs):
            start = len(ctx) - 1
            out.append(_score(logits[row, start : start + len(cont)], cont))
        return out

    def _shared_batches(self, groups: list[list[int]], pairs) -> list[list[list[int]]]:
        """Groups with the same number of choices, sorted by context length (longest first), packed so that
        a batch holds about `batch_size` continuation rows."""
        by_width: dict[int, list[list[int]]] = {}
        for idx in groups:
            by_width.setdefault(len(idx), []).append(idx)
        batches = []
        for width, members in by_width.items():
            members.sort(key=lambda g: -len(pairs[g[0]][0]))
            per_batch = max(1, self.batch_size // width)
            batches += [members[b : b + per_batch] for b in range(0, len(members), per_batch)]
        return batches

    def _score_shared(self, groups: list[list[tuple[list[int], list[int]]]]) -> list[LoglikelihoodResult]:
        """G contexts with k choices each: the contexts run once (right-padded), their KV cache is repeated
        k times, then the G*k choices run as one batch over only their own tokens."""
        import torch

        num_groups, k = len(groups), len(groups[0])
        prefixes = [g[0][0][:-1] for g in groups]
        width_p = max(len(p) for p in prefixes)
        past = None
        if width_p:
            ids = torch.zeros((num_groups, width_p), dtype=torch.long)
            mask = torch.zeros((num_groups, width_p), dtype=torch.long)
            for row, p in enumerate(prefixes):
                ids[row, : len(p)] = torch.tensor(p, dtype=torch.long)
                mask[row, : len(p)] = 1
            # Only the KV cache is needed here; logits_to_keep=1 skips the vocabulary projection of every position.
            past = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=True, logits_to_keep=1).past_key_values
            past.batch_repeat_interleave(k)
        # Row g*k + j: context g's last token, then choice j's tokens but its last; right-padded.
        rows = [[ctx[-1]] + cont[:-1] for g in groups for ctx, cont in g]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width_p + width), dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for row, r in enumerate(rows):
            plen = len(prefixes[row // k])
            ids[row, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[row, :plen] = 1
            mask[row, width_p : width_p + len(r)] = 1
            positions[row] = torch.arange(plen, plen + width)
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), position_ids=positions.to(self.device), past_key_values=past, use_cache=past is not None).logits  # (G*k, W, V)
        self.last_tokens += sum(len(p) for p in prefixes) + sum(len(r) for r in rows)
        conts = [cont for g in groups for _, cont in g]
        return [_score(logits[row, : len(cont)], cont) for row, cont in enumerate(conts)]

    # ----------------------------------------------------------------------------------- generation

    def generate(self, requests: Sequence[GenerateRequest]) -> list[str]:
        """Greedy continuation of each prompt, one request at a time (eval-sized loads, not serving), cut at
        the first stop string; decoding ends once one appears (lm-eval's `until`)."""
        self.last_tokens = 0
        outputs = []
        for req in requests:
            prompt = self._bos + self._encode(req.prompt)
            new = self.greedy_tokens(prompt, req.max_new_tokens, stop=req.stop)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            cuts = [text.index(s) for s in req.stop if s in text]
            outputs.append(text[: min(cuts)] if cuts else text)
        return outputs

    def greedy_tokens(self, prompt: list[int], max_new_tokens: int, *, stop: Sequence[str] = ()) -> list[int]:
        """The greedy continuation's token ids (EOS included when the model emits it), at most
        `max_new_tokens`, ending early once the decoded continuation contains a stop string."""
        import torch
        from transformers import StoppingCriteriaList

        prompt = prompt or [self.tokenizer.eos_token_id]
        ids = torch.tensor([prompt], device=self.device)
        criteria = StoppingCriteriaList([_StopStrings(self.tokenizer, len(prompt), tuple(stop))]) if stop else None
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.eos_token_id, stopping_criteria=criteria)
        self.last_tokens += int(out.shape[1])
        return out[0, len(prompt) :].tolist()


class _StopStrings:
    """A transformers stopping criterion: true once the decoded new tokens contain any stop string (decoded
    text, not token ids, so a stop that a merge hides inside a longer token still stops)."""

    def __init__(self, tokenizer, prompt_len: int, stop: tuple[str, ...]):
        self.tokenizer, self.prompt_len, self.stop = tokenizer, prompt_len, stop

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = [any(s in self.tokenizer.decode(row[self.prompt_len :].tolist(), skip_special_tokens=True) for s in self.stop) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _score(logits, cont: list[int]) -> LoglikelihoodResult:
    """logits (L, V) at the positions that predict `cont` (L tokens)."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(cont, device=logits.device)
    total = float(logprobs.gather(-1, target.unsqueeze(-1)).sum())
    greedy = bool((logprobs.argmax(dim=-1) == target).all())
    return LoglikelihoodResult(logprob=total, is_greedy=greedy, num_tokens=len(cont))


def load_lm(path, *, dtype: str = "float32", device: str = "cpu", batch_size: int = 16, progress: Callable | None = None) -> HFLM:
    """An `HFLM` over an optforge model directory or artifact (quantized modules included)."""
    from optforge.model_io import load_model

    model, tokenizer = load_model(path, dtype=dtype, device=device)
    return HFLM(model, tokenizer, batch_size=batch_size, progress=progress)
