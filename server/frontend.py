"""The request path every transport shares: encode off the event loop, submit to the engine, an
async iterator of the request's events, cancel on exit.

    async for event in frontend.generate(GenerationInput(...), stream=True):
        ...  # chunks, then one final event; errors are raised as lorad.errors types

However the iteration ends (the final event, an error, the consumer closing the iterator or
being cancelled), an unfinished engine request is cancelled, which frees its batch row at the
next step. A transport whose handler can be left suspended (grpc.aio does not resume a handler
blocked in a write whose RPC was cancelled) also calls the cancel function it gets through
`on_submitted` when its call ends. Transports (lorad.server.grpc_service, lorad.server.openai_api)
only translate their messages to GenerationInput and Events to theirs, and name themselves
(`transport`) so `on_done` can count requests per transport.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from lorad.errors import ClientTooSlowError, EngineStoppedError, InvalidRequestError

from lorad.server.engine import Engine
from lorad.server.requests import Event
from lorad.server.sampling import SamplingParams


@dataclass
class GenerationInput:
    """One generation request, transport-neutral. `params` builds SamplingParams from the
    server's default max_new_tokens (so parameter errors surface before tokenizing)."""

    params: Callable[[int], SamplingParams]
    prompt: str | None = None
    messages: list[dict] = field(default_factory=list)
    adapter_id: str | None = None
    timeout: float | None = None  # seconds left until the caller's deadline


class _RequestEvents:
    """One request's events, from the engine thread to the handler's event loop.

    A streaming handler can only take the next event once its last message has been handed to
    the transport, which waits for the client to read. `limit` bounds the events waiting here:
    one more chunk cancels the engine request (freeing its batch row) and queues a
    ClientTooSlowError instead. Without keep_chunks (unary calls) only the final event matters.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, engine: Engine, limit: int | None, keep_chunks: bool):
        self.loop = loop
        self.engine = engine
        self.limit = limit
        self.keep_chunks = keep_chunks
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request_id: int | None = None
        self.overflowed = False
        self._pending = 0
        self._lock = threading.Lock()

    def put(self, event: Event) -> None:  # engine thread
        if event.kind == "chunk" and not self.keep_chunks:
            return
        with self._lock:
            if self.overflowed:
                return
            if event.kind == "chunk" and self.limit is not None and self._pending >= self.limit:
                self.overflowed = True
                event = Event("error", error=ClientTooSlowError(
                    f"the client did not read its stream: {self.limit} chunks were waiting to be sent, so the "
                    "request was cancelled to free its place in the batch"))
            self._pending += 1
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        if self.overflowed and self.request_id is not None:
            self.engine.observer.request_failed("slow_client")
            self.engine.cancel(self.request_id)

    async def get(self) -> Event:
        event = await self.queue.get()
        with self._lock:
            self._pending -= 1
        return event


class Frontend:
    def __init__(self, max_unsent_chunks: int,
                 on_done: Callable[[str, str, float], None] | None = None):
        self.engine: Engine | None = None  # set once the base is loaded
        self.max_unsent_chunks = max_unsent_chunks
        # (transport, outcome "ok" | "cancelled" | "error", seconds) once per request that got here
        self.on_done = on_done

    def engine_or_raise(self) -> Engine:
        if self.engine is None:
            raise EngineStoppedError("the server is still loading the base model; retry shortly")
        return self.engine

    async def _submit(self, request: GenerationInput, stream: bool) -> _RequestEvents:
        engine = self.engine_or_raise()
        if request.prompt and request.messages:
            raise InvalidRequestError("give exactly one of prompt or messages, not both")
        params = request.params(engine.config.default_max_new_tokens)  # cheap checks first
        loop = asyncio.get_running_loop()
        # tokenizing a long prompt takes milliseconds: keep it off the event loop
        prompt_ids = await loop.run_in_executor(
            None, lambda: engine.encode(request.prompt or None, request.messages or None))
        events = _RequestEvents(loop, engine, self.max_unsent_chunks if stream else None, keep_chunks=stream)
        events.request_id = engine.submit(prompt_ids, params, events.put, adapter_id=request.adapter_id or None,
                                          timeout=request.timeout)
        if events.overflowed:  # (only if the engine outran submit's return)
            engine.cancel(events.request_id)
        return events

    async def generate(self, request: GenerationInput, *, stream: bool, transport: str = "grpc",
                       on_submitted: Callable[[Callable[[], None]], None] | None = None,
                       on_refused: Callable[[Exception], None] | None = None) -> AsyncIterator[Event]:
        """Submit and yield the request's events up to the final one (only the final one unless
        `stream`). A refusal at submission (on_refused is told) or an error event is raised."""
        events = None
        finished = False
        started = time.perf_counter()
        outcome = "cancelled"  # unless the final event or an error comes first

        def cancel() -> None:
            if events is not None and not finished:
                events.engine.cancel(events.request_id)

        try:
            try:
                events = await self._submit(request, stream)
            except Exception as exc:
                outcome = "error"
                if on_refused is not None and self.engine is not None:
                    on_refused(exc)
                raise
            if on_submitted is not None:
                on_submitted(cancel)
            while True:
                event = await events.get()
                if event.kind == "error":
                    finished, outcome = True, "error"  # the engine is done with it (or was told to cancel it)
                    raise event.error
                if event.kind == "final":
                    finished, outcome = True, "ok"
                yield event
                if finished:
                    return
        finally:
            cancel()
            if self.on_done is not None:
                self.on_done(transport, outcome, time.perf_counter() - started)
