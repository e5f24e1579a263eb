"""The lorad.v1.Generator service (grpc.aio) on top of the engine.

Handlers turn a GenerateRequest into token ids and SamplingParams, submit to the engine, and
await its events through an asyncio queue the engine thread feeds. A client cancel or an
expired deadline cancels the handler; the handler then cancels the engine request, which
frees its batch slot at the next step.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from lorad.errors import EngineStoppedError, InvalidRequestError, LoradError
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


class GeneratorService(lorad_pb2_grpc.GeneratorServicer):
    def __init__(self, base_name: str):
        self.engine: Engine | None = None  # set once the base is loaded
        self.base_name = base_name

    def _engine(self) -> Engine:
        if self.engine is None:
            raise EngineStoppedError("the server is still loading the base model; retry shortly")
        return self.engine

    async def _submit(self, request, context) -> tuple[Engine, int, asyncio.Queue]:
        engine = self._engine()
        if request.prompt and len(request.messages):
            raise InvalidRequestError("give exactly one of prompt or messages, not both")
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        loop = asyncio.get_running_loop()
        # tokenizing a long prompt takes milliseconds: keep it off the event loop
        prompt_ids = await loop.run_in_executor(None, lambda: engine.encode(request.prompt or None, messages or None))
        params = sampling_params_from(request, engine.config.default_max_new_tokens)
        events: asyncio.Queue = asyncio.Queue()

        def sink(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        request_id = engine.submit(
            prompt_ids, params, sink, adapter_id=request.adapter_id or None, timeout=context.time_remaining()
        )
        return engine, request_id, events

    async def _fail(self, context, error: BaseException):
        if not isinstance(error, LoradError):
            log.exception("unexpected error in a handler", exc_info=error)
        await context.abort(status_for(error), message_for(error))

    async def _events(self, request, context):
        """Submit the request and yield its events up to the final one; an error event, or a
        refusal at submission, ends the RPC with its status; a client that leaves cancels it."""
        engine = request_id = None
        try:
            engine, request_id, events = await self._submit(request, context)
            while True:
                event = await events.get()
                if event.kind == "error":
                    raise event.error
                yield event
                if event.kind == "final":
                    return
        except asyncio.CancelledError:
            if request_id is not None:
                engine.cancel(request_id)
            raise
        except Exception as exc:
            if request_id is not None:
                engine.cancel(request_id)
            elif self.engine is not None:  # refused before queueing; the engine counts the rest
                self.engine.observer.request_failed(status_for(exc).name.lower())
            await self._fail(context, exc)

    async def Generate(self, request, context):
        response = None
        async for event in self._events(request, context):  # ends after the final event
            if event.kind == "final":
                response = final_response(event)
        return response

    async def GenerateStream(self, request, context):
        async for event in self._events(request, context):
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
