"""uvicorn inside the server's event loop: the HTTP API shares the loop (and so the request path
and the engine) with grpc.aio. Start, bound port, graceful stop; BodyLimit, the ASGI guard that
keeps oversized bodies out.

Signals stay with lorad.server.app (drain, then grace): uvicorn's own SIGINT/SIGTERM capture is
turned off here, or it would stop the HTTP side on its own schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl

import uvicorn

from lorad.errors import ConfigError


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield


# bytes past the limit read and dropped before answering 413: a client still sending when the
# answer comes would see a connection reset instead of the answer; beyond this, it does
_DRAIN_BYTES = 64 * 2**20


class BodyLimit:
    """ASGI middleware: a request body above `max_bytes` gets 413 in OpenAI's error shape, without
    being kept (Content-Length first, then counting the chunks of a chunked body). The accepted
    body is handed on in one piece; later receive() calls (disconnect) pass through."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes + _DRAIN_BYTES:
            return await self._too_large(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            more = message.get("more_body", False)
            if size > self.max_bytes + _DRAIN_BYTES:
                return await self._too_large(send)
            if size <= self.max_bytes:
                chunks.append(body)
        if size > self.max_bytes:
            return await self._too_large(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        from lorad.server.openai_api import error_object  # here: openai_api imports this module

        body = json.dumps({"error": error_object(
            413, f"the request body is larger than this server's limit of {self.max_bytes} bytes (--max-request-bytes)",
            code="request_too_large")}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class HttpServer:
    def __init__(self, app, tls_cert: str | None = None, tls_key: str | None = None,
                 tls_client_ca: str | None = None):
        self.app = app
        self.tls = dict(ssl_certfile=tls_cert, ssl_keyfile=tls_key)
        if tls_client_ca:
            self.tls.update(ssl_ca_certs=tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        self.server: _EmbeddedServer | None = None
        self._task: asyncio.Task | None = None

    async def start(self, host: str, port: int) -> int:
        """Bind (a clear error if the port is taken) and serve; returns the bound port."""
        host = host.strip("[]")
        try:
            family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError as exc:
            raise ConfigError(f"http_port: cannot listen on {host}:{port}: {exc} (is the port in use?)") from exc
        sock.listen(2048)
        sock.setblocking(False)
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off", http="h11",
                                ws="none", server_header=False, timeout_keep_alive=30, **self.tls)
        self.server = _EmbeddedServer(config)
        self._task = asyncio.ensure_future(self.server.serve(sockets=[sock]))
        while not self.server.started:  # startup is a few loop turns
            if self._task.done():
                self._task.result()  # raise its start-up error
                raise ConfigError(f"http_port: the HTTP server on {host}:{port} stopped while starting")
            await asyncio.sleep(0.005)
        return sock.getsockname()[1]

    async def stop(self, grace: float) -> None:
        """Stop accepting; in-flight requests (streams too) get `grace` seconds, then are closed."""
        if self.server is None or self._task is None:
            return
        self.server.config.timeout_graceful_shutdown = grace
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=grace + 5)
        except asyncio.TimeoutError:
            self.server.force_exit = True
            await self._task
