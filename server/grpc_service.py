"""The lorad.v1.Generator service (grpc.aio): translation between its messages and the shared
request path, lorad.server.frontend (which submits, streams, bounds a slow reader's buffer and
cancels). However a call ends (the final event, an error, a client cancel, an expired deadline,
a handler left suspended in a blocked write), its engine request is cancelled, which frees its
batch slot at the next step; a streaming client that leaves more than `max_unsent_chunks`
chunks unread ends RESOURCE_EXHAUSTED.

RequestParseGuard covers the wire edge of every service on the server: bytes that do not parse
as the method's request message get INVALID_ARGUMENT with a sentence.
"""

from __future__ import annotations

import inspect
import logging
from typing import Awaitable, Callable

import grpc

from lorad.errors import LoradError
from lorad.v1 import lorad_pb2, lorad_pb2_grpc

from lorad.server.engine import Engine
from lorad.server.frontend import Frontend, GenerationInput
from lorad.server.requests import Event
from lorad.server.sampling import SamplingParams
from lorad.server.status import message_for, status_for

log = logging.getLogger(__name__)

FINISH_REASONS = {
    "length": lorad_pb2.FINISH_REASON_LENGTH,
    "eos": lorad_pb2.FINISH_REASON_EOS,
    "stop": lorad_pb2.FINISH_REASON_STOP,
    "cancelled": lorad_pb2.FINISH_REASON_CANCELLED,
}


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
        adapter_version=event.adapter_version,
    )


class GeneratorService(lorad_pb2_grpc.GeneratorServicer):
    """Translates lorad.v1.Generator calls to the shared request path (lorad.server.frontend)."""

    def __init__(self, base_name: str, frontend: Frontend, listing: Callable[[], Awaitable] | None = None):
        self.frontend = frontend
        self.base_name = base_name
        self.listing = listing  # async () -> ListAdaptersResponse (the adapter manager service's)

    @property
    def engine(self) -> Engine | None:
        return self.frontend.engine

    def _engine(self) -> Engine:
        return self.frontend.engine_or_raise()

    async def _fail(self, context, error: BaseException):
        if not isinstance(error, LoradError):
            log.exception("unexpected error in a handler", exc_info=error)
        await context.abort(status_for(error), message_for(error))

    async def _events(self, request, context, stream: bool):
        """The request's events from the frontend; a refusal or an error event ends the RPC with
        its status; when the call ends (even with this handler suspended) the request is cancelled."""
        generation = GenerationInput(
            params=lambda default: sampling_params_from(request, default),
            prompt=request.prompt or None,
            messages=[{"role": m.role, "content": m.content} for m in request.messages],
            adapter_id=request.adapter_id or None,
            timeout=context.time_remaining(),
        )
        observer = self.engine.observer if self.engine is not None else None
        try:
            async for event in self.frontend.generate(
                    generation, stream=stream,
                    on_submitted=lambda cancel: context.add_done_callback(lambda _ctx: cancel()),
                    on_refused=lambda exc: observer.request_failed(status_for(exc).name.lower())):
                yield event
        except Exception as exc:
            await self._fail(context, exc)

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
        """The same listing as AdapterManager.ListAdapters (read-only, so inference callers may)."""
        try:
            self._engine()
            return await self.listing()
        except Exception as exc:
            await self._fail(context, exc)


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
