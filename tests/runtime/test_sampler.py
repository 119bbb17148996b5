"""Sampler filters and parameter validation."""

import pytest
import torch

from optforge.runtime.sampler import apply_repetition_penalty, filter_logits
from optforge.runtime.sequence import SamplingParams


def kept(logits):
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_top_k_top_p_min_p_keep_the_right_tokens():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log()
    assert kept(filter_logits(logits, top_k=2, top_p=1.0, min_p=0.0)) == {0, 1}
    assert kept(filter_logits(logits, top_k=None, top_p=0.7, min_p=0.0)) == {0, 1}  # 0.5 < 0.7 <= 0.75
    assert kept(filter_logits(logits, top_k=None, top_p=0.5, min_p=0.0)) == {0}
    assert kept(filter_logits(logits, top_k=None, top_p=1.0, min_p=0.3)) == {0, 1, 2}  # >= 0.3 * 0.5


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, [0, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(min_p=1), dict(max_tokens=0), dict(top_k=0), dict(logprobs=21)])
def test_bad_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)

