"""Which eval backend measures a model (`data.eval.backend`, `optforge eval --backend`).

- `hf`: the HF modules (evals/lm.py `HFLM`, evals/perplexity.py `perplexity`).
- `runtime`: the serving runtime's torch runner (evals/runtime_lm.py `RuntimeLM`): what `optforge serve` runs.
- `cpp`: the runtime over the C++ kernels (CPU fp32).
- `onnx`: the artifact's `model.onnx` in onnxruntime (evals/onnx_lm.py `OnnxLM`); log-likelihoods only.
- `auto` (the default): `runtime` where the runtime runs the model, else `hf`. Decided from config.json alone,
  without loading the model, with the reason logged once per process.

Every backend measures perplexity with one definition (evals/perplexity.py `passage_ids`), so the numbers of
two backends differ only by their arithmetic.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

BACKENDS = ("auto", "hf", "runtime", "cpp", "onnx")
_logged: set[str] = set()


def runtime_refusal(path: str | Path) -> str | None:
    """Why the serving runtime cannot run the model at `path` (read from its config.json), None when it can: the
    runtime decoder's own rule (`runtime/architectures.py`)."""
    from transformers import AutoConfig

    from optforge.errors import UserInputError
    from optforge.runtime.architectures import SUPPORTED_MODEL_TYPES, read_architecture

    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return f"{path} has no config.json"
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"the runtime does not run {model_type} models"
    config = AutoConfig.from_pretrained(path)
    try:
        read_architecture(config, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    except UserInputError as e:
        return str(e)
    return None


def resolve_backend(backend: str, path: str | Path) -> str:
    """The backend that measures the model at `path`: `backend` itself, or for `auto` the runtime where it runs
    the model and hf otherwise."""
    if backend != "auto":
        return backend
    reason = runtime_refusal(path)
    if reason is None:
        return "runtime"
    if reason not in _logged:
        _logged.add(reason)
        log.info("evaluating with HF transformers: %s", reason)
    return "hf"
