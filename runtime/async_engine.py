"""The engine behind the server: `Engine.step()` runs in one worker thread; requests arrive from asyncio.

Adds and aborts go through an inbox that the worker drains between steps, so the event loop never waits
for a step. Each request gets an asyncio.Queue of events: ("token", token_id) per new token, then
("done", RequestOutput) or ("error", Failure).

Admission counts real backlog only: requests beyond the `max_num_seqs` that can run at once. More than
`max_waiting` of those and a request is refused (`Overloaded`, HTTP 429), never left to hang. A request
that can never run (out-of-vocabulary ids, longer than the context or the whole KV cache) is refused at
`submit` with ValueError. A request whose step fails is failed alone (the engine isolates it). Anything else
that escapes the worker marks the engine dead: every open request fails at once, later ones are refused
(`EngineDead`, HTTP 503), and `dead_reason` says why, so /health can tell.
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
    """More requests wait for a slot than `max_waiting` allows; the client should retry later (HTTP 429)."""


class EngineDead(Exception):
    """The worker thread has stopped on an unexpected error; nothing more can be generated (HTTP 503)."""


@dataclass(frozen=True)
class Failure:
    """Why a request ended without output: `status` is the HTTP status a plain (non-streamed) answer gets."""

    status: int
    message: str


@dataclass
class Stats:
    """What /metrics reports. Latencies are appended by the worker and drained by the exporter."""

    num_requests: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    num_refused: int = 0
    num_failed: int = 0  # requests ended with an error (their step failed with them alone, or the engine died)
    num_generated_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)


class AsyncEngine:
    def __init__(self, engine: Engine, *, max_waiting: int = 1024):
        self.engine = engine
        self.max_waiting = max_waiting
        self.stats = Stats()
        self.dead_reason: str | None = None  # set once, by the worker, when it stops on an unexpected error
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        # request id -> (its event loop, its event queue, arrival and token times); every open request is here
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, list[float]]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._num_pending = 0
        self._thread = threading.Thread(target=self._loop, name="optforge-engine", daemon=True)
        self._thread.start()

    @property
    def num_waiting(self) -> int:
        """Requests not running yet (queued in the scheduler or still in the inbox)."""
        return len(self.engine.scheduler.waiting) + self._num_pending

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_backlog(self) -> int:
        """Open requests beyond those that can run at once: the work that truly waits."""
        return max(0, len(self._streams) - self.engine.config.max_num_seqs)

    @property
    def is_alive(self) -> bool:
        return self.dead_reason is None and self._thread.is_alive()

    def submit(self, request_id: str, token_ids: list[int], params: SamplingParams) -> asyncio.Queue:
        """Queue a tokenized request; returns its event queue. Raises EngineDead, Overloaded, or ValueError
        where the request can never run (see `Engine.check_request`)."""
        self._raise_if_dead()
        if self.num_backlog >= self.max_waiting:
            self.stats.num_refused += 1
            raise Overloaded(f"{self.num_backlog} requests wait for one of {self.engine.config.max_num_seqs} slots (limit {self.max_waiting}); retry later")
        token_ids = self.engine.check_request(token_ids, params)
        events: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), events, [time.perf_counter()])
        if self.dead_reason is not None:  # died while this request was being registered: it would never be failed
            self._streams.pop(request_id, None)
            self._raise_if_dead()
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

    def _raise_if_dead(self) -> None:
        if not self.is_alive:
            raise EngineDead(self.dead_reason or "the engine thread is not running")

    # ---- the worker thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if not self.engine.has_unfinished:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._publish(self.engine.step())
        except Exception as exc:  # nothing may kill this thread silently: say so, and fail every open request
            log.exception("the engine stopped")
            self._die(f"the engine stopped on an unexpected error ({type(exc).__name__}: {exc}); restart the server")

    def _die(self, reason: str) -> None:
        self.dead_reason = reason
        for request_id in list(self._streams):
            self._finish(request_id, ("error", Failure(503, reason)))
            self.stats.num_failed += 1

    def _drain_inbox(self) -> None:
        while True:
            try:
                op, request_id, token_ids, params = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "abort":
                self.engine.abort(request_id)
                continue
            self._num_pending -= 1
            if request_id not in self._streams:  # aborted while it sat in the inbox
                continue
            try:
                self.engine.add_request(request_id, token_ids, params)
            except ValueError as exc:  # submit checked the same: only a changed engine config gets here
                self._finish(request_id, ("error", Failure(400, str(exc))))

    def _publish(self, produced) -> None:
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
                self._finish(seq.request_id, ("done", self.engine.output(seq)))
        for seq in self.engine.take_failed():
            if seq.request_id in self._streams:
                self.stats.num_failed += 1
                message = f"generating this request failed ({seq.error}); other requests were not affected"
                self._finish(seq.request_id, ("error", Failure(500, message)))

    def _emit(self, request_id: str, event) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            loop, events, _ = entry
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # its event loop is closed: nobody is listening any more
                self.abort(request_id)

    def _finish(self, request_id: str, event) -> None:
        self._emit(request_id, event)
        self._streams.pop(request_id, None)
