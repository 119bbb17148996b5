"""Run an exported decoder (`export.onnx`, optionally `fuse.onnx_graph`) through onnxruntime.

The graph's KV cache is explicit: each step feeds `past_key_values.{i}.key/value` (B, Hkv, P, D) and gets
`present.*` back with P + S positions. The runner owns those arrays between steps (numpy, no torch), so a
greedy loop here is the onnxruntime counterpart of `model.generate(do_sample=False)` in PyTorch.
Providers: CPU by default; CUDA when asked for and installed (`onnxruntime-gpu`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from optforge.artifact import LAYOUT_FILE
from optforge.errors import ArtifactError, require

_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class OnnxCausalLM:
    """A KV-cached decoder in onnxruntime. `forward` is one step; `generate` is greedy decoding."""

    def __init__(self, path: str | Path, *, onnx_file: str | None = None, providers: list[str] | None = None, num_threads: int | None = None, qdq_accuracy_level: int = 1):
        ort = require("onnxruntime", "running an ONNX artifact", "pip install onnxruntime (or onnxruntime-gpu for CUDA)")
        path = Path(path)
        if onnx_file is None:
            layout_path = path / LAYOUT_FILE
            info = json.loads(layout_path.read_text()).get("onnx") if layout_path.is_file() else None
            if not info:
                raise ArtifactError(f"{path}: no ONNX graph in {LAYOUT_FILE}; add the `export.onnx` pass to the recipe")
            onnx_file = info["file"]
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        # DequantizeLinear -> MatMul graphs are lowered to MatMulNBits at load; by default onnxruntime then
        # quantizes activations to int8 (accuracy level 4). Level 1 keeps weight-only numerics (fp32 compute).
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(qdq_accuracy_level))
        self.session = ort.InferenceSession(str(path / onnx_file), options, providers=providers or ["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        first = inputs[self.past_names[0]]
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.kv_dtype = _NP_DTYPES[first.type]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype) for _ in self.past_names]

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """(B, S) ids and positions, past per layer (B, Hkv, P, D) -> logits (B, S, V), present (P + S)."""
        feeds = {"input_ids": input_ids.astype(np.int64), "position_ids": position_ids.astype(np.int64)}
        feeds.update({name: value.astype(self.kv_dtype, copy=False) for name, value in zip(self.past_names, past)})
        logits, *present = self.session.run(self.output_names, feeds)
        return logits, present

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None) -> np.ndarray:
        """Greedy decoding for (B, T) prompts of one length; returns (B, T + n) ids (stops early on all-EOS)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        batch, length = ids.shape
        past = self.empty_past(batch)
        step_ids, positions = ids, np.broadcast_to(np.arange(length), (batch, length))
        done = np.zeros(batch, dtype=bool)
        for _ in range(max_new_tokens):
            logits, past = self.forward(step_ids, positions, past)
            token = logits[:, -1].argmax(-1)  # (B,)
            if eos_token_id is not None:
                token = np.where(done, eos_token_id, token)
                done |= token == eos_token_id
            ids = np.concatenate([ids, token[:, None]], axis=1)
            if done.all():
                break
            step_ids, positions = token[:, None], np.full((batch, 1), ids.shape[1] - 1)
        return ids

    def time_step(self, *, batch: int, seq: int, past: int, repeats: int = 10, warmup: int = 2, seed: int = 0) -> float:
        """Median seconds of one forward with `seq` new tokens after `past` cached ones (random inputs)."""
        rng = np.random.default_rng(seed)
        vocab = int(self.session.get_outputs()[0].shape[-1]) if isinstance(self.session.get_outputs()[0].shape[-1], int) else 1000
        ids = rng.integers(0, vocab, (batch, seq))
        pos = np.broadcast_to(np.arange(past, past + seq), (batch, seq))
        cache = [rng.standard_normal((batch, self.kv_heads, past, self.head_dim)).astype(self.kv_dtype) for _ in self.past_names]
        times = []
        for i in range(warmup + repeats):
            started = time.perf_counter()
            self.forward(ids, pos, cache)
            if i >= warmup:
                times.append(time.perf_counter() - started)
        return float(np.median(times))
