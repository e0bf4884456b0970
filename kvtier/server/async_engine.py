"""AsyncEngine: the LLMEngine on one background thread, driven from an asyncio event loop.

    event loop (HTTP handlers)                     engine thread
    add_requests() ── command queue ──────────────> engine.add_request()
    OutputStream.close() ── abort command ────────> engine.abort_request()   (frees its KV blocks)
                                                    engine.step() while there is work
    OutputStream <── call_soon_threadsafe(_deliver) ─ RequestOutputs of the step

Ownership: only the engine thread changes the LLMEngine (it is not thread-safe; the handlers' worker
threads only read its tokenizer and limits to validate prompts); only the event loop
touches `_streams` and the metrics. After every round of commands and steps the engine thread
publishes a stats snapshot, so /health and /metrics answer without waiting for a step.

Failures: the engine ends a request that fails inside a step by itself (finish_reason "error",
its stream raises EngineError) while the others go on; only a step failure no request can be
blamed for fails every request in flight, and the loop keeps serving. Shutdown (`drain`) refuses
new requests and gives the running ones a bounded time before ending them with an error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from kvtier.engine.llm_engine import LLMEngine
from kvtier.outputs import RequestOutput
from kvtier.sampling_params import SamplingParams
from kvtier.server.metrics import RequestTimer, ServerMetrics

logger = logging.getLogger(__name__)

_STOP = object()
STATS_INTERVAL_S = 0.05  # how stale /metrics may be while requests run


class EngineError(RuntimeError):
    """The engine failed while running a request (or was shut down under it); `status` and `code`
    are what the client is told."""

    def __init__(self, message: str, status: int = 500, code: str = "internal_error"):
        super().__init__(message)
        self.status, self.code = status, code


def _shutting_down(message: str) -> EngineError:
    return EngineError(message, 503, "server_shutting_down")


class QueueFullError(RuntimeError):
    """Admitting the request would exceed --max-waiting-requests."""


@dataclasses.dataclass
class EngineRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None = None


@dataclasses.dataclass
class _Tracked:
    stream: OutputStream
    timer: RequestTimer
    waiting: bool = True  # admitted, no output yet: counts against --max-waiting-requests


class OutputStream:
    """The outputs of one HTTP request's engine requests (one per prompt), in arrival order.

    Iterating ends when all of them finished; `close()` aborts the ones still running."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str]):
        self.engine, self.request_ids = engine, request_ids
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._unfinished = set(request_ids)

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._unfinished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        if item.finished:
            self._unfinished.discard(item.request_id)
        return item

    def close(self) -> None:
        """Abort what has not finished; safe to call more than once."""
        for request_id in self._unfinished:
            self.engine.abort(request_id)
        self._unfinished.clear()


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, max_waiting_requests: int | None = None):
        self.engine, self.metrics, self.max_waiting_requests = engine, metrics, max_waiting_requests
        self._commands: queue.Queue[Any] = queue.Queue()
        self._streams: dict[str, _Tracked] = {}  # event loop only
        self._in_engine: set[str] = set()  # engine thread only: ids added and not yet finished
        self._num_waiting_first_token = 0  # admitted requests without their first token yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.latest_stats: dict[str, int | float] = engine.stats()  # replaced whole by the engine thread
        self._stats_time = time.monotonic()
        self.draining = False  # set by drain(): no new requests

    # -- life cycle (event loop) ----------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="kvtier-engine", daemon=True)
        self._thread.start()

    def shutdown(self, join_timeout_s: float = 10.0) -> None:
        self._commands.put(_STOP)
        if self._thread is not None:
            self._thread.join(join_timeout_s)  # a step in a hung kernel must not hang the exit
        self._fail(list(self._streams), _shutting_down("the server shut down before this request finished"))

    def drain(self, timeout_s: float) -> None:
        """Begin a graceful shutdown (event loop): refuse new requests at once; end the ones still
        running after `timeout_s` with an error, so their clients get an error event, not a cut
        connection."""
        if self.draining:
            return
        self.draining = True
        logger.warning("kvtier: shutting down; %d requests in flight get %.0f s to finish (--shutdown-timeout)",
                       len(self._streams), timeout_s)
        self._loop.call_later(timeout_s, self._expire, timeout_s)

    def drain_threadsafe(self, timeout_s: float) -> None:
        """drain() from a signal handler or another thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.drain, timeout_s)

    def _expire(self, timeout_s: float) -> None:
        request_ids = list(self._streams)
        if request_ids:
            logger.warning("kvtier: ending %d requests still running after %.0f s", len(request_ids), timeout_s)
        for request_id in request_ids:
            self._commands.put(lambda rid=request_id: self._abort(rid))
        self._fail(request_ids, _shutting_down(f"the server shut down before this request finished "
                                               f"(--shutdown-timeout {timeout_s:g} s)"))

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- requests (event loop) ------------------------------------------------------------------

    def add_requests(self, requests: list[EngineRequest]) -> OutputStream:
        """Queue all of one HTTP request's engine requests, or none (raises QueueFullError, EngineError)."""
        if not self.is_running:
            raise EngineError("the engine loop is not running", 503, "engine_unavailable")
        if self.draining:
            raise _shutting_down("the server is shutting down and accepts no new requests")
        limit = self.max_waiting_requests
        if limit is not None and self._num_waiting_first_token + len(requests) > limit:
            raise QueueFullError(f"the server has {self._num_waiting_first_token} requests waiting for "
                                 f"their first token, at its limit of {limit} (--max-waiting-requests); "
                                 "retry later")
        stream = OutputStream(self, [r.request_id for r in requests])
        now = time.monotonic()
        for req in requests:
            self._streams[req.request_id] = _Tracked(stream, RequestTimer(now))
            self._num_waiting_first_token += 1
            self._commands.put(lambda req=req: self._add(req))
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request now; a no-op once it finished."""
        tracked = self._streams.pop(request_id, None)
        if tracked is None:
            return
        self._mark_started(tracked)
        self.metrics.observe_end("abort")
        self._commands.put(lambda: self._abort(request_id))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            tracked = self._streams.get(out.request_id)
            if tracked is None:
                continue  # aborted while the step ran
            if out.error is not None:  # this request alone failed inside a step
                self._fail([out.request_id], EngineError(f"the engine failed while running this request: "
                                                         f"{out.error}"))
                continue
            self._mark_started(tracked)
            self.metrics.observe(tracked.timer, out, now)
            if out.finished:
                del self._streams[out.request_id]
            tracked.stream.queue.put_nowait(out)

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        for request_id in request_ids:
            tracked = self._streams.pop(request_id, None)
            if tracked is not None:
                self._mark_started(tracked)
                self.metrics.observe_end("error")
                tracked.stream.queue.put_nowait(error)

    def _mark_started(self, tracked: _Tracked) -> None:
        if tracked.waiting:
            tracked.waiting = False
            self._num_waiting_first_token -= 1

    # -- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._run_commands(block=not self._in_engine):
                if self._in_engine:
                    self._step()
                self._publish_stats()
        except BaseException:  # a bug: say so loudly, and let no request wait forever
            logger.critical("the engine loop died", exc_info=True)
            self._post(lambda: self._fail(list(self._streams), EngineError("the engine loop died")))
            raise

    def _publish_stats(self) -> None:
        """A fresh snapshot for /health and /metrics: at once when the engine goes idle, else at most
        every STATS_INTERVAL_S (a snapshot walks every running request: not once per decode step)."""
        now = time.monotonic()
        if self._in_engine and now - self._stats_time < STATS_INTERVAL_S:
            return
        self.latest_stats, self._stats_time = self.engine.stats(), now

    def _run_commands(self, block: bool) -> bool:
        """Run queued commands (waiting for one when idle); False once asked to stop."""
        try:
            command = self._commands.get(block=block)
            while command is not _STOP:
                self._run_one(command)
                command = self._commands.get_nowait()
        except queue.Empty:
            return True
        return False

    @staticmethod
    def _run_one(command: Callable[[], None]) -> None:
        try:
            command()
        except Exception:  # a failing command must not end the loop that serves everyone else
            logger.exception("engine command failed")

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # the engine could blame no single request: fail them all
            logger.exception("engine step failed; failing the %d requests in flight", len(self._in_engine))
            self._fail_in_engine(EngineError(f"the engine failed while running this request: "
                                             f"{type(e).__name__}: {e}"))
            return
        for out in outputs:
            if out.finished:
                self._in_engine.discard(out.request_id)
        if outputs:
            self._post(self._deliver, outputs)

    def _add(self, req: EngineRequest) -> None:
        try:
            # validated before queuing (serving.py: the prompt off the event loop, the parameters
            # against the model), so the engine thread only queues it
            self.engine.add_processed_request(req.prompt, req.prompt_token_ids, req.params, req.request_id,
                                              req.cache_salt)
        except Exception as e:  # unexpected: fail only this request
            logger.exception("engine rejected request %s", req.request_id)
            self._post(self._fail, [req.request_id], EngineError(f"the engine rejected the request: {e}"))
            return
        self._in_engine.add(req.request_id)

    def _abort(self, request_id: str) -> None:
        if request_id in self._in_engine:
            self._in_engine.discard(request_id)
            self.engine.abort_request(request_id)

    def _fail_in_engine(self, error: EngineError) -> None:
        failed = list(self._in_engine)
        self._in_engine.clear()
        for request_id in failed:
            try:
                self.engine.abort_request(request_id)
            except Exception:
                logger.exception("could not abort request %s after the engine failure", request_id)
        self._post(self._fail, failed, error)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop closed under us: nobody is left to tell
            logger.warning("event loop closed; dropped %s", getattr(fn, "__name__", fn))
