"""Label-free agreement on the user's own prompts: does the optimized model still say what the original said?

The user gives a JSONL file, one prompt a line: `{"prompt": "..."}` (plain text, BOS first for tokenizers that
add it) or `{"messages": [{"role": ..., "content": ...}, ...]}` (the tokenizer's chat template with the
generation prompt). The reference model (the recipe's source) answers each greedily once, up to `max_tokens`
new tokens or its EOS; a candidate answers the same way and is scored per prompt:

- `prompts.exact_match`: 1 when its tokens equal the reference's token for token, else 0. 0/1 per prompt, so
  the paired accuracy gate (Agresti-Min) reads it like a task's accuracy. The reference agrees with itself
  by definition (1.0), so a gate against the source reads "at most N points of prompts may change".
- `prompts.match_tokens`: tokens before the first divergence, averaged over prompts (the full length where
  the outputs are equal). A reading aid, not a gate metric.

Greedy decoding one prompt at a time keeps the comparison free of padding effects: the same model on the same
machine gives the same tokens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from optforge.errors import DataError

# Bump when how prompts are tokenized or generated changes: it keys the cached greedy outputs.
AGREEMENT_VERSION = 1


def read_prompts(path: str | Path) -> list[dict]:
    """The prompts of a JSONL file, each `{"prompt": str}` or `{"messages": [{"role", "content"}, ...]}`.
    Blank lines are skipped; any other line that does not parse raises DataError naming its number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompts file {path} does not exist (expected a JSONL file, one {{\"prompt\": ...}} or {{\"messages\": [...]}} a line)")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        problem = _prompt_problem(item)
        if problem:
            raise DataError(f"{path} line {number}: {problem}")
        prompts.append(item)
    if not prompts:
        raise DataError(f"prompts file {path} holds no prompts; write one JSON object a line")
    return prompts


def _prompt_problem(item) -> str | None:
    if not isinstance(item, dict) or len(set(item) & {"prompt", "messages"}) != 1:
        return 'expected an object with exactly one of "prompt" (a string) or "messages" (a list of {"role", "content"})'
    if "prompt" in item:
        return None if isinstance(item["prompt"], str) and item["prompt"] else '"prompt" must be a non-empty string'
    messages = item["messages"]
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list of {"role": ..., "content": ...}'
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f'"messages"[{i}] must be an object with string "role" and "content"'
    return None


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def prompt_tokens(lm, item: dict) -> list[int]:
    """Token ids the model is given for one prompt (`lm` an `HFLM`)."""
    if "messages" in item:
        text = lm.tokenizer.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=False)
        return lm._encode(text)  # the template writes its own BOS where the model wants one
    return lm._bos + lm._encode(item["prompt"])


def greedy_outputs(lm, prompts: Sequence[dict], max_tokens: int) -> list[list[int]]:
    """Each prompt's greedy continuation as token ids (EOS included where the model stops)."""
    return [lm.greedy_tokens(prompt_tokens(lm, item), max_tokens) for item in prompts]


def agreement(reference: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Per prompt: (1 if the token sequences are equal else 0, tokens before the first divergence)."""
    if len(reference) != len(outputs):
        raise ValueError(f"agreement needs one output per reference output; found {len(outputs)} and {len(reference)}")
    exact, matched = [], []
    for ref, out in zip(reference, outputs):
        n = 0
        while n < min(len(ref), len(out)) and ref[n] == out[n]:
            n += 1
        exact.append(int(list(ref) == list(out)))
        matched.append(n)
    return exact, matched
