"""The server's context length and KV budget, settled at start-up rather than discovered by failing requests.

`--max-model-len` (prompt + output tokens per request) may not exceed the model's own context length, and one
request of that length must fit the KV cache (`--kv-cache-memory`); otherwise the server refuses to start and
says which flag to change. Without `--max-model-len` it is the model's context length, at most 4096, or less
where the KV cache holds less (the CPU default budget of 512 MiB holds under 4096 tokens of a 3B-8B fp32
model), and the log says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from optforge.errors import UserInputError

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 4096


def model_context_length(model_dir: Path) -> int | None:
    """The model's own context length (max_position_embeddings in config.json), where it says."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None  # the loader reports a missing or broken config.json in its own words
    value = config.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def initial_max_model_len(requested: int | None, model_limit: int | None) -> int:
    """The context length to build the engine with (checked before loading any weights)."""
    if requested is not None:
        if requested < 2:
            raise UserInputError(f"--max-model-len {requested}: a request needs at least one prompt and one new token")
        if model_limit is not None and requested > model_limit:
            raise UserInputError(f"--max-model-len {requested} is beyond the model's context length of {model_limit} tokens "
                                 f"(max_position_embeddings in config.json); use at most {model_limit}")
        return requested
    return min(model_limit or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)


def fit_max_model_len(engine, requested: int | None) -> int:
    """Check (or, where defaulted, shrink) the engine's max_model_len against its KV cache; returns it."""
    wanted, kv_tokens = engine.config.max_model_len, engine.kv_capacity
    if wanted <= kv_tokens:
        return wanted
    if requested is not None:
        raise UserInputError(f"--max-model-len {wanted} does not fit the KV cache, which holds {kv_tokens} tokens: "
                             f"lower --max-model-len to at most {kv_tokens}, or raise --kv-cache-memory")
    log.info("max_model_len %d (not %d): that is what the KV cache holds; raise --kv-cache-memory for longer requests", kv_tokens, wanted)
    engine.set_max_model_len(kv_tokens)
    return kv_tokens
