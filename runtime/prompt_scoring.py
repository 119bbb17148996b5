"""Prompt log-probabilities (`SamplingParams.prompt_logprobs_from`): which rows of a step score a prompt token,
and the log-softmax gathered at those tokens. Shared by the torch and C++ runners; a request that asks for
nothing adds no row, so serving steps run as before.
"""

from __future__ import annotations

import torch

from optforge.runtime.sequence import Sequence


def prompt_positions_to_score(seq: Sequence, num_new_tokens: int) -> range:
    """Positions of this chunk whose logits predict a scored prompt token (params.prompt_logprobs_from)."""
    first = seq.params.prompt_logprobs_from
    if first is None:
        return range(0)
    start = seq.num_computed_tokens
    return range(max(start, first - 1), min(start + num_new_tokens, seq.num_prompt_tokens - 1))


def record_prompt_logprobs(logits: torch.Tensor, scored: list[tuple[Sequence, int, int]]) -> None:
    """logits (len(scored), V) of the rows in `scored` -> each sequence's `prompt_logprobs[position]`."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor([seq.token_ids[pos] for seq, _, pos in scored], device=logits.device)
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).tolist()
    is_argmax = (logprobs.argmax(dim=-1) == targets).tolist()
    for (seq, _, pos), lp, top in zip(scored, picked, is_argmax):
        seq.prompt_logprobs[pos] = (lp, top)
