"""The offline API and the engine behind the server: `LLM(artifact).generate(prompts, SamplingParams(...))`.

`step()` reads as: schedule, run, postprocess. Stop strings are checked on the detokenized output here
(the scheduler only knows token ids); a request that hits one is finished and its blocks freed at once.

Overlapped decode (`async_scheduling`): when a step only decodes, every request in it takes the argmax of
the raw logits and no request waits, the step is launched instead of run, and each following `step()`
launches the next decode step before reading the previous one's tokens. The next step's input tokens go
from the GPU's argmax straight into its inputs (`ModelRunner.launch`), so the GPU does not idle while the
host reads tokens back, checks stops and schedules. The next step is built as the scheduler would build it:
the same sequences minus those that reach max_tokens, with one more block where one fills up. A sequence
that stops on a token or a stop string is finished when its token is read; the row computed for it in the
step already launched is dropped (its KV write lands in a position past its end, in a block that is not in
the prefix cache). Waiting requests, sampling, penalties, logprobs or too few free blocks end the overlap:
the engine then collects and goes back to scheduling step by step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from optforge.errors import UserInputError
from optforge.runtime.block_manager import BlockManager
from optforge.runtime.sampler import takes_raw_argmax
from optforge.runtime.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
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
    async_scheduling: bool = True  # greedy decode steps: launch the next step before this one's tokens are read
    backend: str = "torch"  # torch (ModelRunner) | cpp (the C++ runtime's kernels and KV cache, CPU, fp32 KV)
    num_threads: int = 0  # cpp backend: CPU threads (0: all cores)
    verify: bool = True  # check the artifact's files against its manifest before loading (see artifact.verify_for_loading)


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
        self.num_overlapped_steps = 0  # steps launched before the previous step's tokens were read
        self._inflight: tuple[ScheduledBatch, object] | None = None  # a launched step whose tokens are not read yet

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
            self._settle_inflight()

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list[tuple[Sequence, int]]:
        """Schedule, run, postprocess. Returns (sequence, new token) for each token produced this step."""
        if self._inflight is not None:
            return self._step_overlapped()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        if self._overlappable(batch):
            self._inflight = (batch, self.runner.launch(batch, [None] * len(batch)))
            return self._step_overlapped()
        sampled = self.runner.run(batch)
        self.scheduler.postprocess(batch, sampled)
        self.num_steps += 1
        produced = []
        for seq in batch.seqs:
            if seq.seq_id in sampled:
                produced.append((seq, sampled[seq.seq_id]))
                self._check_stop_string(seq)
            if seq.is_finished:
                self.requests.pop(seq.request_id, None)
        return produced

    # ---- overlapped decode (see the module docstring) -----------------------------------------------------
    def _overlappable(self, batch: ScheduledBatch) -> bool:
        # every running sequence in the batch: the steps that follow repeat it, so none may be left out
        return (self.config.async_scheduling and hasattr(self.runner, "launch") and not self.scheduler.waiting
                and len(batch) == len(self.scheduler.running) and self.runner.can_launch(batch)
                and all(takes_raw_argmax(seq.params) for seq in batch.seqs))

    def _step_overlapped(self) -> list[tuple[Sequence, int]]:
        batch, launched = self._inflight
        self._inflight = None
        live = [seq for seq in batch.seqs if not seq.is_finished]  # aborted since the launch: their row is dropped
        for seq in live:  # the launched step computes each row's KV: commit it as postprocess would
            seq.num_computed_tokens += 1
            self.block_manager.commit(seq)
        following = self._next_decode(live)
        if following is not None:
            rows = {seq.seq_id: r for r, seq in enumerate(batch.seqs)}
            self._inflight = (following, self.runner.launch(following, [rows[seq.seq_id] for seq in following.seqs]))
            self.num_overlapped_steps += 1
        tokens = self.runner.collect(launched)
        self.num_steps += 1
        produced = []
        for seq, token in zip(batch.seqs, tokens):
            if seq.is_finished:
                continue
            seq.token_ids.append(token)
            produced.append((seq, token))
            reason = self.scheduler.stop_reason(seq)
            if reason:
                self.scheduler.finish(seq, reason)
            else:
                self._check_stop_string(seq)
            if seq.is_finished:
                self.requests.pop(seq.request_id, None)
        self._settle_inflight()
        return produced

    def _settle_inflight(self) -> None:
        """Read (and drop) a launched step whose every request has finished since: no launch is left unread,
        so the runner's host buffers are never refilled while a copy from them may still be queued."""
        if self._inflight is not None and all(seq.is_finished for seq in self._inflight[0].seqs):
            self.runner.collect(self._inflight[1])
            self._inflight = None

    def _next_decode(self, live: list[Sequence]) -> ScheduledBatch | None:
        """The decode step after the launched one, built before its tokens are known; None where the scheduler
        could decide otherwise (a request waits) or where there is nothing certain to run."""
        if not live or self.scheduler.waiting or not self.config.async_scheduling:
            return None
        seqs = [seq for seq in live if seq.num_output_tokens + 1 < seq.params.max_tokens]  # the rest end at "length"
        if not seqs or sum(self.block_manager.num_blocks_needed(seq, 1) for seq in seqs) > self.block_manager.num_free_blocks:
            return None
        batch = ScheduledBatch()
        for seq in seqs:
            batch.add(seq, 1, self.block_manager.allocate(seq, 1))
        return batch

    def _check_stop_string(self, seq: Sequence) -> None:
        if not seq.is_finished and seq.params.stop and self._stop_string_hit(seq):
            self.scheduler.finish(seq, "stop")

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
                            num_threads=config.num_threads, verify=config.verify)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Engine(None, tokenizer, config, runner=runner), tokenizer


class LLM:
    """Offline batch generation over an optforge artifact or any model directory the loader reads."""

    def __init__(self, model: str | Path, config: EngineConfig | None = None, **overrides):
        from optforge.artifact import verify_for_loading
        from optforge.runtime.loader import load_model

        config = replace(config or EngineConfig(), **overrides)
        if config.backend == "cpp":  # the C++ loader verifies the same way (and refuses the same paths)
            self.engine, self.tokenizer = _cpp_engine(Path(model), config)
            return
        if config.backend != "torch":
            raise UserInputError(f"unknown backend '{config.backend}' (torch or cpp)")
        verify_for_loading(model, verify=config.verify)
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
