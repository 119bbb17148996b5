"""The offline API and the engine behind the server: `LLM(artifact).generate(prompts, SamplingParams(...))`.

`step()` reads as: schedule, run, postprocess. Stop strings are checked on the detokenized output here
(the scheduler only knows token ids); a request that hits one is finished and its blocks freed at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from optforge.errors import UserInputError
from optforge.runtime.block_manager import BlockManager
from optforge.runtime.scheduler import Scheduler, SchedulerConfig
from optforge.runtime.sequence import SamplingParams, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    dtype: str = "float32"  # weights and KV cache: float32 | bfloat16 | float16
    device: str = "cpu"  # cpu | cuda
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # KV blocks; None: from kv_cache_bytes (CPU 512 MiB; CUDA half the free memory)
    kv_cache_bytes: int | None = None
    max_model_len: int = 4096  # prompt + output tokens per request, at most
    max_num_seqs: int = 64  # sequences per step
    max_num_batched_tokens: int = 2048  # tokens per step (prefill chunks + decodes)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    use_cuda_graphs: bool = True
    backend: str = "torch"  # torch (ModelRunner) | cpp (the C++ runtime's kernels and KV cache, CPU, fp32 KV)
    num_threads: int = 0  # cpp backend: CPU threads (0: all cores)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_cached_tokens: int = 0
    logprobs: list[dict] = field(default_factory=list)


class Engine:
    """Owns the model runner, the scheduler and the tokenizer; one `step()` advances every running request."""

    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig(), runner=None):
        """`model`: an HF module for the torch ModelRunner; or None with a ready `runner` (the C++ backend)."""
        from optforge.runtime.model_runner import ModelRunner

        self.config, self.tokenizer = config, tokenizer
        self.runner = runner or ModelRunner(
            model, block_size=config.block_size, num_blocks=config.num_blocks, kv_cache_bytes=config.kv_cache_bytes,
            max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs, use_cuda_graphs=config.use_cuda_graphs,
        )
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens, enable_chunked_prefill=config.enable_chunked_prefill),
            self.block_manager,
        )
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids = (eos,) if isinstance(eos, int) else tuple(eos or ())
        self.requests: dict[str, Sequence] = {}
        self.num_steps = 0

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams = SamplingParams()) -> Sequence:
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(token_ids) + params.max_tokens > self.config.max_model_len:
            raise ValueError(f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len {self.config.max_model_len}")
        if not params.ignore_eos:
            params = replace(params, stop_token_ids=tuple(params.stop_token_ids) + self.eos_token_ids)
        seq = Sequence(token_ids, params, request_id=request_id, arrival_time=time.perf_counter())
        self.scheduler.add(seq)
        self.requests[request_id] = seq
        return seq

    def abort(self, request_id: str) -> None:
        """Drop a request (a client that went away): its blocks are freed now."""
        seq = self.requests.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list[tuple[Sequence, int]]:
        """Schedule, run, postprocess. Returns (sequence, new token) for each token produced this step."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        sampled = self.runner.run(batch)
        self.scheduler.postprocess(batch, sampled)
        self.num_steps += 1
        produced = []
        for seq in batch.seqs:
            if seq.seq_id in sampled:
                produced.append((seq, sampled[seq.seq_id]))
                if not seq.is_finished and seq.params.stop and self._stop_string_hit(seq):
                    self.scheduler.finish(seq, "stop")
            if seq.is_finished:
                self.requests.pop(seq.request_id, None)
        return produced

    def _stop_string_hit(self, seq: Sequence) -> bool:
        text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        return any(s in text for s in seq.params.stop)

    def output(self, seq: Sequence) -> RequestOutput:
        token_ids = seq.output_token_ids
        if token_ids and seq.finish_reason == "stop" and token_ids[-1] in seq.params.stop_token_ids:
            token_ids = token_ids[:-1]  # the stop token itself is not part of the text
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer is not None else ""
        for stop in seq.params.stop:
            if stop in text:
                text = text[: text.index(stop)]
        return RequestOutput(seq.request_id, seq.token_ids[: seq.num_prompt_tokens], list(seq.output_token_ids), text, seq.finish_reason, seq.num_cached_tokens, seq.logprobs)


def _cpp_engine(path: Path, config: EngineConfig) -> tuple[Engine, object]:
    """The Python engine over the C++ runtime's model (runtime/cpp_runner.py); CPU only, fp32 activations."""
    from transformers import AutoTokenizer

    from optforge.runtime.cpp_runner import CppModelRunner

    if config.device != "cpu":
        raise UserInputError(f"the cpp backend runs on the CPU; got --device {config.device}")
    if config.dtype != "float32":
        raise UserInputError(f"the cpp backend computes in float32 (weights as the artifact stores them); got --dtype {config.dtype}")
    runner = CppModelRunner(path, block_size=config.block_size, num_blocks=config.num_blocks, kv_cache_bytes=config.kv_cache_bytes,
                            num_threads=config.num_threads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Engine(None, tokenizer, config, runner=runner), tokenizer


class LLM:
    """Offline batch generation over an optforge artifact or any model directory the loader reads."""

    def __init__(self, model: str | Path, config: EngineConfig | None = None, **overrides):
        from optforge.runtime.loader import load_model

        config = replace(config or EngineConfig(), **overrides)
        if config.backend == "cpp":
            self.engine, self.tokenizer = _cpp_engine(Path(model), config)
            return
        if config.backend != "torch":
            raise UserInputError(f"unknown backend '{config.backend}' (torch or cpp)")
        hf_model, tokenizer = load_model(model, dtype=config.dtype, device=config.device)
        self.engine = Engine(hf_model, tokenizer, config)
        self.tokenizer = tokenizer

    @classmethod
    def from_model(cls, model, tokenizer, config: EngineConfig | None = None) -> "LLM":
        llm = cls.__new__(cls)
        llm.engine, llm.tokenizer = Engine(model, tokenizer, config or EngineConfig()), tokenizer
        return llm

    def generate(self, prompts: str | list[str] | list[list[int]], params: SamplingParams | list[SamplingParams] = SamplingParams()) -> list[RequestOutput]:
        """Run every prompt to completion with continuous batching; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.engine.add_request(f"gen-{i}-{id(self)}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params_list))]
        while self.engine.has_unfinished:
            self.engine.step()
        return [self.engine.output(seq) for seq in seqs]
