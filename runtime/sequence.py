"""A request as the runtime sees it: its tokens, its sampling parameters and where its KV lives.

Pure Python (no torch), shared by the block manager, the scheduler and the engine.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from enum import Enum


# Below this, logits / temperature overflows float32 for ordinary logits and the softmax turns to NaN;
# 0.01 already makes sampling all but greedy, and 0 asks for greedy outright.
MIN_TEMPERATURE = 1e-2


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick tokens for one request. The defaults give greedy decoding of up to 16 tokens."""

    temperature: float = 0.0  # 0 means greedy (argmax); >= MIN_TEMPERATURE samples from softmax(logits / temperature)
    top_k: int | None = None  # keep only the k most likely tokens (None: all)
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability sums to >= top_p, in (0, 1]
    min_p: float = 0.0  # drop tokens with probability < min_p * max probability, in [0, 1)
    repetition_penalty: float = 1.0  # > 1 penalizes tokens already in prompt or output (CTRL-style)
    seed: int | None = None  # per-request seed: same seed, same output, whatever the batch around it
    max_tokens: int = 16  # new tokens at most
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before the first one found
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens besides the tokenizer's eos
    ignore_eos: bool = False  # keep going past eos (benchmarks need exact output lengths)
    logprobs: int | None = None  # also return the log-probability of the chosen token and the top-n
    # Also score the prompt: the log-probability of every prompt token from this position on (>= 1), given
    # the tokens before it (evals' loglikelihood). The prefix cache then serves only whole blocks before
    # position `prompt_logprobs_from - 1`, whose logits predict the first scored token. None: no scoring.
    prompt_logprobs_from: int | None = None

    def __post_init__(self):
        numbers = (self.temperature, self.top_p, self.min_p, self.repetition_penalty)
        checks = [
            (all(math.isfinite(x) for x in numbers), "temperature, top_p, min_p and repetition_penalty must be finite"),
            (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE, f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}"),
            (self.top_k is None or self.top_k >= 1, "top_k must be >= 1 or null"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (self.prompt_logprobs_from is None or self.prompt_logprobs_from >= 1, "prompt_logprobs_from must be >= 1 or null"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request's tokens. KV for `token_ids[:num_computed_tokens]` is in the blocks of `block_table`."""

    token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    seq_id: int = field(default_factory=lambda: next(_ids))
    request_id: str = ""
    arrival_time: float = 0.0  # time.perf_counter() when the request arrived
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at the last admission
    num_preemptions: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" (its step failed; see `error`)
    error: str | None = None  # why the engine gave up on this request, where finish_reason is "error"
    logprobs: list[dict] = field(default_factory=list)
    # With params.prompt_logprobs_from: position -> (log-probability of the prompt token there, whether it is
    # the argmax of its logits), filled by the runner as prefill chunks run (a recompute writes the same keys).
    prompt_logprobs: dict[int, tuple[float, bool]] = field(default_factory=dict)

    def __post_init__(self):
        if not self.token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.token_ids = list(self.token_ids)
        self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefill(self) -> bool:
        """True while more than the last token still has to run (a prompt, or a recompute after preemption)."""
        return self.num_uncomputed_tokens > 1
