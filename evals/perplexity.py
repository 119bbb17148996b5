"""Perplexity over held-out passages, with per-passage results for paired comparisons.

Each passage is tokenized (no special tokens added; BOS first where the tokenizer adds one), truncated to
`max_length` tokens, and every token after the first is scored given the ones before it. Perplexity =
exp(sum of NLL / number of scored tokens), the token-weighted mean over the whole set (not a mean of
per-passage perplexities).

`perplexity` scores with an HF model (padded batches); `lm_perplexity` with any eval `LM` that has
`sequence_nll` (RuntimeLM, OnnxLM). Both take their token ids from `passage_ids` and their result from
`perplexity_result`, so every backend measures the same definition.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# 2: BOS first where the tokenizer adds one (Gemma); unchanged numbers for tokenizers without (SmolLM2).
EVAL_VERSION = 2


def leading_bos(tokenizer) -> list[int]:
    """[bos id] when the tokenizer puts BOS first in every encoding (Gemma, Llama-3), else [] (SmolLM2).

    Models trained to always see BOS first run far off their serving distribution without it (Gemma-3-270M:
    BoolQ rows 0-20 perplexity 108 without BOS, 17 with), so calibrating without it would fit scales to activations the
    served model never produces.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    return [bos] if tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos] else []


@dataclass(frozen=True)
class PerplexityResult:
    value: float
    # Per passage: summed NLL (nats) and the number of tokens scored.
    nll: list[float]
    tokens: list[int]
    seconds: float

    def to_dict(self) -> dict:
        total = sum(self.tokens)
        return {
            "metric": "perplexity",
            "value": self.value,
            "n": len(self.tokens),
            "tokens": total,
            "seconds": self.seconds,
            "tokens_per_s": total / self.seconds if self.seconds > 0 else None,
            "per_example": {"nll": self.nll, "tokens": self.tokens},
        }


def passage_ids(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Each passage's token ids as every backend scores them: BOS first where the tokenizer adds one (context,
    never a target), then the text's tokens, truncated to `max_length`."""
    bos = leading_bos(tokenizer)
    return [(bos + tokenizer(t, add_special_tokens=False)["input_ids"])[:max_length] for t in texts]


def perplexity_result(nll: list[float], counts: list[int], started: float) -> PerplexityResult:
    total = sum(counts)
    if total == 0:
        raise ValueError("no tokens to score: every passage is shorter than two tokens")
    return PerplexityResult(value=math.exp(sum(nll) / total), nll=nll, tokens=counts, seconds=time.perf_counter() - started)


def lm_perplexity(lm, texts: list[str], *, max_length: int = 256, progress=None) -> PerplexityResult:
    """Perplexity through an eval `LM` with `sequence_nll(ids) -> [(summed NLL, tokens scored)]`."""
    started = time.perf_counter()
    encoded = passage_ids(lm.tokenizer, texts, max_length)
    advance = progress("perplexity", len(encoded)) if progress else (lambda n=1: None)
    scored = lm.sequence_nll(encoded)
    advance(len(encoded))
    return perplexity_result([nll for nll, _ in scored], [n for _, n in scored], started)


@torch.inference_mode()
def perplexity(model, tokenizer, texts: list[str], *, max_length: int = 256, batch_size: int = 8, progress=None) -> PerplexityResult:
    start = time.perf_counter()
    encoded = passage_ids(tokenizer, texts, max_length)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll = [0.0] * len(encoded)
    counts = [0] * len(encoded)
    # Sort by length so a batch pads little; results go back to their original positions.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    advance = progress("perplexity", len(encoded)) if progress else (lambda n=1: None)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, : len(encoded[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
        logprobs = F.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:]
        token_nll = -logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask[:, 1:]  # (B, T-1)
        for row, i in enumerate(idx):
            nll[i] = float(token_nll[row].sum())
            counts[i] = int(mask[row, 1:].sum())
        advance(len(idx))
    return perplexity_result(nll, counts, start)
