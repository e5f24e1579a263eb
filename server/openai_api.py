"""The OpenAI-compatible HTTP API (FastAPI): every adapter is a model, the base is a model too.

    POST /v1/completions, POST /v1/chat/completions   (stream=true: server-sent events, data: [DONE])
    GET  /v1/models, /v1/models/{id}                   the base and every servable adapter, with its version
    GET  /health, /ready                               the same answers as the metrics port

This module only translates: bodies (lorad.server.openai_schema) to GenerationInput, the shared
request path (lorad.server.frontend) does the rest, as for gRPC; its events become OpenAI's JSON.
Errors: lorad errors get the HTTP status of their gRPC code (lorad.server.status) in OpenAI's
shape {"error": {"message", "type", "param", "code"}}; code is the gRPC status name.

`model` names an adapter id, or the base: its name, "base", or vLLM's "base:ADAPTER" /
"BASENAME:ADAPTER" spelling for an adapter. `model` alone decides what is served: an
`x-lorad-adapter` header (the routing key balancers hash on, lorad.haproxy) is ignored here, as
the gRPC service ignores it; a wrong key costs adapter loads on the wrong replica, never a
wrong answer.

A client that disconnects cancels its request (the frontend frees its batch row at the next
engine step), while it waits for its first token, while its stream runs, or while a
non-streaming request generates.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorad.errors import AdapterNotFoundError, InvalidRequestError, LoradError, QueueFullError

from lorad.server.adapter_service import LOCATIONS
from lorad.server.auth import INFERENCE_SERVICE, AccessPolicy
from lorad.server.frontend import Frontend, GenerationInput
from lorad.server.http_server import BodyLimit
from lorad.server.openai_schema import ChatCompletionBody, CompletionBody
from lorad.server.readiness import Readiness
from lorad.server.requests import Event
from lorad.server.status import http_status_for, message_for, status_for

log = logging.getLogger(__name__)

FINISH_REASONS = {"length": "length", "eos": "stop", "stop": "stop"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
               429: "rate_limit_error", 499: "cancelled", 503: "service_unavailable", 504: "timeout_error"}
LOCATION_NAMES = {value: name for name, value in LOCATIONS.items()}
_PARAM = re.compile(r"^([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+)?):")
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# seconds the server may spend on a request (gRPC's deadline); past it: 504, the row freed
TIMEOUT_HEADER = "x-lorad-timeout"


def _timeout(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < 10**7:  # also refuses nan and inf
        raise InvalidRequestError(f"{TIMEOUT_HEADER}: {value[:40]!r} is not a number of seconds above 0")
    return seconds


def error_object(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object (the value of "error" in a response body, or of an SSE error event)."""
    return {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error_object(status, message, param, code)}, status_code=status, headers=headers)


def error_body(error: BaseException) -> tuple[int, dict, dict]:
    """(HTTP status, OpenAI error object, headers) for any error, from the one table in status.py."""
    status = http_status_for(error)
    message = message_for(error).replace("max_new_tokens:", "max_tokens:", 1)  # OpenAI's name for it
    match = _PARAM.match(message) if isinstance(error, InvalidRequestError) else None
    headers = {"Retry-After": "1"} if status in (429, 503) else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    body = error_object(status, message, match.group(1) if match else None, status_for(error).name.lower())
    return status, body, headers


class _Authorize:
    """ASGI middleware: /v1/ paths need the API token (when the server has one) before anything
    else happens, so a caller without it learns nothing from how its body is judged."""

    def __init__(self, app, api: "OpenAIApi"):
        self.app = app
        self.api = api

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            error = self.api.policy.refusal(f"/{INFERENCE_SERVICE}/Generate",
                                            [("authorization", header)] if header else [])
            if error is not None:
                self.api.count_refusal(status_for(error).name.lower())
                status, body, headers = error_body(error)
                return await JSONResponse({"error": body}, status_code=status, headers=headers)(scope, receive, send)
        await self.app(scope, receive, send)


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


class _EventStream(StreamingResponse):
    """A streaming response that always runs `on_close` when the response ends, however it ends
    (finished, client gone before or during the stream, the server stopping)."""

    def __init__(self, content, on_close: Callable[[], Awaitable[None]]):
        super().__init__(content, media_type="text/event-stream", headers=_SSE_HEADERS)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, awaitable):
    """The result of `awaitable`, or _ClientGone (after cancelling it) if the client leaves first."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is stopping: take the work down with the handler
        work.cancel()
        raise
    finally:
        gone.cancel()
    if work.done():
        return work.result()
    work.cancel()  # its request is cancelled as the frontend's iterator unwinds
    await asyncio.wait({work})
    raise _ClientGone()


class _Shaper:
    """One request's events in OpenAI's JSON (completion or chat, whole or as stream chunks)."""

    def __init__(self, chat: bool, model: str, adapter: str | None, tokenizer, logprobs: bool, token_ids: bool):
        self.chat = chat
        self.model = model
        self.adapter = adapter
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.token_ids = token_ids
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.offset = 0  # characters of completion text before the next logprob token (text_offset)

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def fingerprint(self, version: str) -> str:
        return f"lorad:{self.adapter}@{version}" if self.adapter else "lorad:base"

    def _logprobs(self, token_ids: list[int], logprobs: list[float]) -> dict | None:
        if not self.logprobs:
            return None
        tokens = [self.tokenizer.decode([t]) for t in token_ids]
        if self.chat:
            return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []}
                                for s, lp in zip(tokens, logprobs)], "refusal": None}
        offsets = []
        for s in tokens:
            offsets.append(self.offset)
            self.offset += len(s)
        return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}

    @staticmethod
    def usage(final: Event) -> dict:
        return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
                "total_tokens": final.prompt_tokens + final.completion_tokens}

    def full(self, final: Event) -> dict:
        choice = {"index": 0, "logprobs": self._logprobs(final.token_ids, final.logprobs),
                  "finish_reason": FINISH_REASONS.get(final.finish_reason, "stop")}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": final.text}
        else:
            choice["text"] = final.text
        if self.token_ids:
            choice["token_ids"] = final.token_ids
        return {**self._head(False), "system_fingerprint": self.fingerprint(final.adapter_version),
                "choices": [choice], "usage": self.usage(final)}

    def chunk(self, text: str, token_ids: list[int] = (), logprobs: list[float] = (), finish: str | None = None,
              version: str | None = None, role: bool = False) -> dict:
        choice = {"index": 0, "logprobs": self._logprobs(list(token_ids), list(logprobs)) if token_ids else None,
                  "finish_reason": finish}
        if self.chat:
            choice["delta"] = ({"role": "assistant", "content": text} if role else {"content": text}) if not finish else {}
        else:
            choice["text"] = text
        if self.token_ids:
            choice["token_ids"] = list(token_ids)
        out = {**self._head(True), "choices": [choice]}
        if version is not None:
            out["system_fingerprint"] = self.fingerprint(version)
        return out


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class OpenAIApi:
    def __init__(self, frontend: Frontend, readiness: Readiness, policy: AccessPolicy,
                 listing: Callable[[], Awaitable], base_name: str, *, max_concurrency: int, max_body_bytes: int,
                 observer=None):
        # the limits come from ServerConfig (http_max_concurrency, max_request_bytes): no second default
        self.frontend = frontend
        self.readiness = readiness
        self.policy = policy
        self.listing = listing  # async () -> ListAdaptersResponse (the adapter manager service's)
        self.base_name = base_name  # replaced by the resolved display name once the base is loaded
        self.observer = observer  # lorad.server.metrics.Metrics (request_failed, transport_request)
        self.max_concurrency = max_concurrency
        self.in_flight = 0
        self.started = int(time.time())
        # the ASGI app uvicorn serves: token first, then the body's size, then FastAPI
        self.app = _Authorize(BodyLimit(self._build(), max_body_bytes), self)

    # --- the app ----------------------------------------------------------------------------

    def _build(self) -> FastAPI:
        app = FastAPI(title="lorad", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(LoradError)
        async def lorad_error(_request, exc: LoradError):
            status, body, headers = error_body(exc)
            return JSONResponse({"error": body}, status_code=status, headers=headers)

        @app.exception_handler(RequestValidationError)
        async def invalid_body(_request, exc: RequestValidationError):
            self.count_refusal("invalid_argument")
            message, param = _validation_message(exc)
            return error_response(400, message, param=param, code="invalid_argument")

        @app.exception_handler(StarletteHTTPException)
        async def http_error(_request, exc: StarletteHTTPException):
            message = {404: "no such endpoint: lorad serves /v1/completions, /v1/chat/completions, /v1/models, "
                            "/health and /ready", 405: "method not allowed on this endpoint"}.get(
                exc.status_code, str(exc.detail))
            return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

        @app.exception_handler(_ClientGone)
        async def client_gone(_request, _exc):
            return Response(status_code=499)  # nobody reads it; the request was cancelled

        @app.get("/health")
        @app.get("/ready")
        async def probe(request: Request):
            status, body = self.readiness.probe(request.url.path)
            return Response(body, status_code=status, media_type="application/json",
                            headers={"Cache-Control": "no-store"})

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": await self._models()}

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str):
            for entry in await self._models():
                if entry["id"] == model_id:
                    return entry
            raise AdapterNotFoundError(f"model {model_id!r} not found; GET /v1/models lists the models this server serves")

        @app.post("/v1/completions")
        async def completions(request: Request, body: CompletionBody):
            return await self._generate(request, body, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request, body: ChatCompletionBody):
            return await self._generate(request, body, chat=True)

        return app

    # --- helpers ----------------------------------------------------------------------------

    def count_refusal(self, kind: str) -> None:
        if self.observer is not None:
            self.observer.request_failed(kind)
            self.observer.transport_request("http", "error", 0.0)

    def _adapter_for(self, model: str) -> str | None:
        """The adapter id `model` names (None = the base)."""
        if model in (self.base_name, "base"):
            return None
        for prefix in (f"{self.base_name}:", "base:"):
            if model.startswith(prefix):
                if model == prefix:
                    raise InvalidRequestError(f"model: {model!r} names no adapter after the colon")
                return model[len(prefix):]
        return model

    async def _models(self) -> list[dict]:
        listing = await self.listing()
        data = [{"id": self.base_name, "object": "model", "created": self.started, "owned_by": "lorad",
                 "root": self.base_name, "parent": None, "lorad": {"kind": "base"}}]
        for info in listing.adapters:
            if info.error:  # broken, or trained for another base: `lorad adapters list` shows why
                continue
            data.append({"id": info.id, "object": "model", "created": self.started, "owned_by": "lorad",
                         "root": info.id, "parent": self.base_name,
                         "lorad": {"kind": "adapter", "version": info.digest, "rank": info.rank,
                                   "lora_alpha": info.lora_alpha, "tier": LOCATION_NAMES.get(info.location, "disk"),
                                   "pinned": info.pinned}})
        return data

    # --- generation ---------------------------------------------------------------------------

    async def _generate(self, request: Request, body: CompletionBody | ChatCompletionBody, chat: bool):
        try:
            engine = self.frontend.engine_or_raise()
            body.refuse_unsupported()
            adapter = self._adapter_for(body.model)
            logprobs = bool(body.logprobs) if chat else body.logprobs is not None
            generation = GenerationInput(
                params=lambda default: body.sampling(default, logprobs),
                prompt=None if chat else body.text(),
                messages=body.lorad_messages() if chat else [],
                adapter_id=adapter,
                timeout=_timeout(request.headers.get(TIMEOUT_HEADER)),
            )
            if self.in_flight >= self.max_concurrency:
                raise QueueFullError(f"this server is answering {self.in_flight} HTTP generation requests "
                                     "(--http-max-concurrency); retry later")
        except LoradError as exc:
            self.count_refusal(status_for(exc).name.lower())
            raise
        shaper = _Shaper(chat, body.model, adapter, engine.tokenizer, logprobs, bool(body.return_token_ids))
        observer = self.observer
        events = self.frontend.generate(
            generation, stream=bool(body.stream), transport="http",
            on_refused=(lambda exc: observer.request_failed(status_for(exc).name.lower())) if observer else None)
        self.in_flight += 1
        streaming = False
        try:
            try:
                first = await _unless_disconnected(request, anext(events))
            except AdapterNotFoundError as exc:
                raise AdapterNotFoundError(f"model {body.model!r}: {exc}; GET /v1/models lists the models this "
                                           "server serves") from None
            if not body.stream:
                return JSONResponse(shaper.full(first))
            streaming = True
            sse = self._stream(shaper, first, events, body.include_usage)

            async def close() -> None:
                await sse.aclose()
                await events.aclose()  # an unfinished request is cancelled here
                self.in_flight -= 1

            return _EventStream(sse, close)
        finally:
            if not streaming:
                await events.aclose()
                self.in_flight -= 1

    async def _stream(self, shaper: _Shaper, first: Event, events, include_usage: bool):
        usage = {"usage": None} if include_usage else {}
        if shaper.chat:
            yield _sse({**shaper.chunk("", role=True), **usage})
        event = first
        try:
            while True:
                if event.kind == "chunk":
                    if event.text or (event.token_ids and (shaper.logprobs or shaper.token_ids)):
                        yield _sse({**shaper.chunk(event.text, event.token_ids, event.logprobs), **usage})
                else:  # final
                    finish = FINISH_REASONS.get(event.finish_reason, "stop")
                    yield _sse({**shaper.chunk("", finish=finish, version=event.adapter_version), **usage})
                    if include_usage:
                        yield _sse({**shaper.chunk("", version=event.adapter_version), "choices": [],
                                    "usage": shaper.usage(event)})
                    break
                event = await anext(events)
        except LoradError as exc:  # after the headers went out: an error event, as vLLM sends it
            _status, body, _headers = error_body(exc)
            yield _sse({"error": body})
        yield _sse("[DONE]")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One sentence for pydantic's errors: the first field at fault (union members merged)."""
    errors = exc.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'it does not parse')})", None
    loc = [p for p in first["loc"] if p != "body"]
    if not loc:
        return f"the body must be a JSON object with the request's fields ({first['msg']})", None
    param = ".".join(str(p) for p in loc[:1] + [p for p in loc[1:] if isinstance(p, int)])
    if first["type"] == "extra_forbidden":
        return (f"{param}: is not a field lorad accepts (the README's OpenAI section lists the supported "
                "fields)", param)
    if first["type"] == "missing":
        return f"{param}: is required", param
    same = [e["msg"] for e in errors if [p for p in e["loc"] if p != "body"][:1] == loc[:1]]
    return f"{param}: {' or '.join(dict.fromkeys(same))}", param
