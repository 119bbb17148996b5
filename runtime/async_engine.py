"""The engine behind the server: `Engine.step()` runs in one worker thread; requests arrive from asyncio.

Adds and aborts go through an inbox that the worker drains between steps, so the event loop never waits
for a step. Each request gets an asyncio.Queue of events: ("token", token_id) per new token, then
("done", RequestOutput). A full queue of waiting requests is refused (`Overloaded`), never left to hang.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from optforge.runtime.llm import Engine
from optforge.runtime.sequence import SamplingParams

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """More requests are waiting than `max_waiting` allows; the client should retry later (HTTP 429)."""


@dataclass
class Stats:
    """What /metrics reports. Latencies are appended by the worker and drained by the exporter."""

    num_requests: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    num_refused: int = 0
    num_generated_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)


class AsyncEngine:
    def __init__(self, engine: Engine, *, max_waiting: int = 1024):
        self.engine = engine
        self.max_waiting = max_waiting
        self.stats = Stats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, list[float]]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._num_pending = 0
        self._thread = threading.Thread(target=self._loop, name="optforge-engine", daemon=True)
        self._thread.start()

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + self._num_pending

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    def submit(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> asyncio.Queue:
        """Queue a request; returns its event queue. Raises Overloaded or ValueError (bad request)."""
        if self.num_waiting >= self.max_waiting:
            self.stats.num_refused += 1
            raise Overloaded(f"{self.num_waiting} requests are waiting (limit {self.max_waiting}); retry later")
        token_ids = self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        if len(token_ids) + params.max_tokens > self.engine.config.max_model_len:
            raise ValueError(f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of {self.engine.config.max_model_len} tokens")
        events: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), events, [time.perf_counter()])
        self._num_pending += 1
        self._inbox.put(("add", request_id, token_ids, params))
        self._wake.set()
        self.stats.num_requests += 1
        return events

    def abort(self, request_id: str) -> None:
        """Free a request's blocks (its client went away). Safe to call after it finished."""
        if self._streams.pop(request_id, None) is not None:
            self.stats.num_aborted += 1
            self._inbox.put(("abort", request_id, None, None))
            self._wake.set()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    # ---- the worker thread --------------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while True:
            try:
                op, request_id, token_ids, params = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                self._num_pending -= 1
                if request_id in self._streams:  # not aborted while it sat in the inbox
                    self.engine.add_request(request_id, token_ids, params)
            else:
                self.engine.abort(request_id)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            if not self.engine.has_unfinished:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                produced = self.engine.step()
            except Exception:  # a broken step must not kill the server silently: fail every open request
                log.exception("engine step failed")
                for request_id in list(self._streams):
                    self._emit(request_id, ("error", "internal error while generating"))
                    self.engine.abort(request_id)
                continue
            now = time.perf_counter()
            for seq, token in produced:
                entry = self._streams.get(seq.request_id)
                if entry is None:
                    continue
                times = entry[2]
                (self.stats.ttft_s if len(times) == 1 else self.stats.itl_s).append(now - times[-1])
                times.append(now)
                self.stats.num_generated_tokens += 1
                self._emit(seq.request_id, ("token", token))
                if seq.is_finished:
                    self.stats.num_finished += 1
                    self._emit(seq.request_id, ("done", self.engine.output(seq)))
                    self._streams.pop(seq.request_id, None)

    def _emit(self, request_id: str, event) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            loop, events, _ = entry
            loop.call_soon_threadsafe(events.put_nowait, event)
