"""The lorad.v1.Generator service (grpc.aio) on top of the engine.

Handlers turn a GenerateRequest into token ids and SamplingParams, submit to the engine, and
await its events through a queue the engine thread feeds. However a call ends (the final
event, an error, a client cancel, an expired deadline, a handler left suspended in a blocked
write), its engine request is cancelled, which frees its batch slot at the next step. A
streaming client that stops reading gets at most `max_unsent_chunks` chunks buffered for it;
then its request is cancelled and the call ends RESOURCE_EXHAUSTED, so a slow consumer never
holds a batch row.

RequestParseGuard covers the wire edge of every service on the server: bytes that do not parse
as the method's request message get INVALID_ARGUMENT with a sentence.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading

import grpc

from lorad.errors import ClientTooSlowError, EngineStoppedError, InvalidRequestError, LoradError
from lorad.v1 import lorad_pb2, lorad_pb2_grpc

from lorad.server.engine import Engine, Event
from lorad.server.sampling import SamplingParams
from lorad.server.status import message_for, status_for

log = logging.getLogger(__name__)

FINISH_REASONS = {
    "length": lorad_pb2.FINISH_REASON_LENGTH,
    "eos": lorad_pb2.FINISH_REASON_EOS,
    "stop": lorad_pb2.FINISH_REASON_STOP,
    "cancelled": lorad_pb2.FINISH_REASON_CANCELLED,
}
LOCATIONS = {
    "disk": lorad_pb2.ADAPTER_LOCATION_DISK,
    "host": lorad_pb2.ADAPTER_LOCATION_HOST,
    "device": lorad_pb2.ADAPTER_LOCATION_DEVICE,
}
DEFAULT_MAX_UNSENT_CHUNKS = 256


def sampling_params_from(request: lorad_pb2.GenerateRequest, default_max_new_tokens: int) -> SamplingParams:
    """Proto defaults (0) mean 'off' or 'server default'; anything else is validated."""
    return SamplingParams(
        max_new_tokens=request.max_new_tokens or default_max_new_tokens,
        temperature=request.temperature,
        top_p=request.top_p or 1.0,
        top_k=request.top_k,
        seed=request.seed if request.HasField("seed") else None,
        repetition_penalty=request.repetition_penalty or 1.0,
        stop=tuple(request.stop),
        logprobs=request.logprobs,
    )


def final_response(event: Event) -> lorad_pb2.GenerateResponse:
    return lorad_pb2.GenerateResponse(
        text=event.text,
        token_ids=event.token_ids,
        finish_reason=FINISH_REASONS[event.finish_reason],
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        token_logprobs=event.logprobs,
    )


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


class GeneratorService(lorad_pb2_grpc.GeneratorServicer):
    def __init__(self, base_name: str, max_unsent_chunks: int = DEFAULT_MAX_UNSENT_CHUNKS):
        self.engine: Engine | None = None  # set once the base is loaded
        self.base_name = base_name
        self.max_unsent_chunks = max_unsent_chunks

    def _engine(self) -> Engine:
        if self.engine is None:
            raise EngineStoppedError("the server is still loading the base model; retry shortly")
        return self.engine

    async def _submit(self, request, context, stream: bool) -> tuple[Engine, _RequestEvents]:
        engine = self._engine()
        if request.prompt and len(request.messages):
            raise InvalidRequestError("give exactly one of prompt or messages, not both")
        params = sampling_params_from(request, engine.config.default_max_new_tokens)  # cheap checks first
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        loop = asyncio.get_running_loop()
        # tokenizing a long prompt takes milliseconds: keep it off the event loop
        prompt_ids = await loop.run_in_executor(None, lambda: engine.encode(request.prompt or None, messages or None))
        events = _RequestEvents(loop, engine, self.max_unsent_chunks if stream else None, keep_chunks=stream)
        events.request_id = engine.submit(
            prompt_ids, params, events.put, adapter_id=request.adapter_id or None, timeout=context.time_remaining()
        )
        if events.overflowed:  # (only if the engine outran submit's return)
            engine.cancel(events.request_id)
        return engine, events

    async def _fail(self, context, error: BaseException):
        if not isinstance(error, LoradError):
            log.exception("unexpected error in a handler", exc_info=error)
        await context.abort(status_for(error), message_for(error))

    async def _events(self, request, context, stream: bool):
        """Submit the request and yield its events up to the final one; an error event, or a
        refusal at submission, ends the RPC with its status. Whatever ends the call, an
        unfinished engine request is cancelled: here when this generator is closed or
        cancelled, and by the RPC's done callback when it is left suspended (a handler blocked
        in a write whose RPC is cancelled is never resumed)."""
        engine = events = None
        finished = False
        try:
            engine, events = await self._submit(request, context, stream)
            request_id = events.request_id
            context.add_done_callback(lambda _ctx: None if finished else engine.cancel(request_id))
            while True:
                event = await events.get()
                if event.kind == "error":
                    finished = True  # the engine is done with it (or has been told to cancel it)
                    raise event.error
                if event.kind == "final":
                    finished = True
                yield event
                if finished:
                    return
        except Exception as exc:
            if events is None and self.engine is not None:  # refused before queueing; the engine counts the rest
                self.engine.observer.request_failed(status_for(exc).name.lower())
            await self._fail(context, exc)
        finally:
            if events is not None and not finished:
                engine.cancel(events.request_id)

    async def Generate(self, request, context):
        response = None
        async for event in self._events(request, context, stream=False):  # ends after the final event
            if event.kind == "final":
                response = final_response(event)
        return response

    async def GenerateStream(self, request, context):
        async for event in self._events(request, context, stream=True):
            if event.kind == "chunk":
                yield lorad_pb2.GenerateStreamResponse(
                    chunk=lorad_pb2.TokenChunk(text=event.text, token_ids=event.token_ids, token_logprobs=event.logprobs)
                )
            else:
                yield lorad_pb2.GenerateStreamResponse(final=final_response(event))

    async def ListAdapters(self, request, context):
        try:
            engine = self._engine()
            loop = asyncio.get_running_loop()
            statuses = await loop.run_in_executor(None, engine.list_adapters)
        except Exception as exc:
            await self._fail(context, exc)
            return
        return lorad_pb2.ListAdaptersResponse(
            adapters=[
                lorad_pb2.AdapterInfo(
                    id=s.adapter_id,
                    rank=s.rank,
                    target_modules=list(s.target_modules),
                    size_bytes=s.size_bytes,
                    location=LOCATIONS[s.location],
                    lora_alpha=s.lora_alpha,
                    error=s.error,
                )
                for s in statuses
            ],
            base_model=self.base_name,
            max_loras=engine.config.max_loras,
            max_lora_rank=engine.config.max_lora_rank,
        )


# --- the wire edge ------------------------------------------------------------------------------


class _Unparsed:
    """What a guarded deserializer returns for bytes that are not the request message."""

    def __init__(self, message: str):
        self.message = message


class RequestParseGuard(grpc.aio.ServerInterceptor):
    """Bytes that do not parse as a method's request message (corrupt wire format, a string
    field with invalid UTF-8) end the call INVALID_ARGUMENT with a sentence. Left to grpc, a
    deserializer's exception becomes UNKNOWN carrying a Python class name."""

    def __init__(self, on_refused=None):
        self.on_refused = on_refused  # called with the method name of each refused call

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        fields = {"request_deserializer": _guarded_deserializer(handler.request_deserializer)}
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                fields[kind] = self._guarded(behavior, method, handler.request_streaming, handler.response_streaming)
        return handler._replace(**fields)

    async def _refuse(self, context, unparsed: _Unparsed, method: str):
        if self.on_refused is not None:
            self.on_refused(method)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, unparsed.message)

    def _guarded(self, behavior, method: str, request_streaming: bool, response_streaming: bool):
        guard = self

        async def checked_requests(requests, context):
            async for request in requests:
                if isinstance(request, _Unparsed):
                    await guard._refuse(context, request, method)
                yield request

        async def first_check(request, context):
            if request_streaming:
                return checked_requests(request, context)
            if isinstance(request, _Unparsed):
                await guard._refuse(context, request, method)
            return request

        if response_streaming:
            async def streaming(request, context):
                result = behavior(await first_check(request, context), context)
                if inspect.isasyncgen(result):
                    async for response in result:
                        yield response
                elif inspect.isawaitable(result):  # a handler that writes through context.write
                    await result
            return streaming

        async def unary(request, context):
            result = behavior(await first_check(request, context), context)
            return await result if inspect.isawaitable(result) else result
        return unary


def _guarded_deserializer(deserialize):
    message_type = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = getattr(message_type, "full_name", "request")

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a custom deserializer raises
            reason = str(exc).rsplit(": ", 1)[-1].strip().rstrip(".") or "it does not parse"
            return _Unparsed(f"the request is not a valid {name} message ({reason[:1].lower() + reason[1:]})")

    return parse
