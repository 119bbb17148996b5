"""Turn the last-position logits of a step into next tokens, one row per sequence.

Order per row (as in HF's logits processors): repetition penalty, temperature, top-k, top-p, min-p, then a
draw with the request's own generator. The generator is seeded from (seed, number of tokens generated so
far), so a seeded request gives the same tokens whatever batch it runs in and after a preemption.
Greedy rows take the argmax of the raw logits. Logprobs are of the model's raw distribution.
"""

from __future__ import annotations

import torch

from optforge.runtime.sequence import SamplingParams, Sequence


def _seeded_generator(seq: Sequence, device: torch.device) -> torch.Generator | None:
    if seq.params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed((seq.params.seed * 1_000_003 + seq.num_output_tokens) % (2**63))
    return gen


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive logits of seen tokens by `penalty`, multiply negative ones. (V,) -> (V,)"""
    if penalty == 1.0 or not token_ids:
        return logits
    seen = torch.tensor(sorted(set(token_ids)), device=logits.device)
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_logits(logits: torch.Tensor, *, top_k: int | None, top_p: float, min_p: float) -> torch.Tensor:
    """Set the logits of tokens that top-k, top-p and min-p exclude to -inf. (V,) -> (V,)"""
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def _logprobs(raw: torch.Tensor, token: int, top_n: int) -> dict:
    logp = raw.float().log_softmax(-1)
    top = torch.topk(logp, top_n) if top_n else None
    return {
        "token": token,
        "logprob": float(logp[token]),
        "top": {int(i): float(v) for i, v in zip(top.indices, top.values)} if top is not None else {},
    }


def takes_raw_argmax(params: SamplingParams) -> bool:
    """Whether a request's next token is the argmax of the raw logits: greedy, no penalty, no logprobs (of its
    output or its prompt: a launched step returns only tokens)."""
    return params.is_greedy and params.repetition_penalty == 1.0 and params.logprobs is None and params.prompt_logprobs_from is None


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], argmax: torch.Tensor | None = None) -> list[int]:
        """logits (B, V) for `seqs` in order -> one token id per sequence; records logprobs on the sequence.
        `argmax` (B,), where the caller has it already (a CUDA graph computes it), saves a launch for greedy rows."""
        if all(takes_raw_argmax(s.params) for s in seqs):
            return (argmax if argmax is not None else logits.argmax(-1)).tolist()
        tokens = []
        for row, seq in zip(logits.float(), seqs):
            tokens.append(self._sample_row(row, seq))
        return tokens

    def _sample_row(self, raw: torch.Tensor, seq: Sequence) -> int:
        p = seq.params
        logits = apply_repetition_penalty(raw, seq.token_ids, p.repetition_penalty)
        if p.is_greedy:
            token = int(logits.argmax())
        else:
            logits = filter_logits(logits / p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p)
            probs = logits.softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=_seeded_generator(seq, raw.device)))
        if p.logprobs is not None:
            seq.logprobs.append(_logprobs(raw, token, p.logprobs))
        return token
