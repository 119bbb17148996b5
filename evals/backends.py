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
    """Why the serving runtime cannot run the model at `path` (read from its config.json), None when it can.
    The same rule as runtime/decoder.py `Decoder`: a supported model type, without sliding-window attention."""
    from optforge.runtime.decoder import SUPPORTED_MODEL_TYPES

    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return f"{path} has no config.json"
    config = json.loads(config_path.read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"the runtime does not run {model_type} models"
    if config.get("sliding_window") and config.get("use_sliding_window", True):
        return f"the runtime does not run sliding-window attention ({model_type}, window {config['sliding_window']})"
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
