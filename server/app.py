"""Assemble and run the server: gRPC (Generator, health, reflection), the OpenAI-compatible HTTP
API (with --http-port), Prometheus, the engine. Both transports share one request path
(lorad.server.frontend).

Start-up order: the gRPC port (and the HTTP port) opens first with health NOT_SERVING and /ready
503 (so orchestrators can probe it), the base loads in a worker thread, then the engine starts
and health turns SERVING.
Shutdown (SIGINT / SIGTERM or `stop()`): health NOT_SERVING and /ready 503, then for
`drain_seconds` new RPCs are still served (balancers are taking this replica out), then no new
RPCs (and no new HTTP connections), in-flight requests get `grace_seconds` to finish, then the
engine stops.
Readiness (lorad.server.readiness) is the one source of truth; gRPC health and the HTTP probes
both report it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from lorad.base_model import LoadedBase, load_base
from lorad.errors import ConfigError
from lorad.v1 import lorad_pb2, lorad_pb2_grpc

from lorad.server.adapter_publish import UploadLimits
from lorad.server.adapter_service import AdapterManagerService
from lorad.server.auth import AuthInterceptor, is_loopback, policy_from, server_credentials
from lorad.server.config import ServerConfig
from lorad.server.engine import Engine
from lorad.server.frontend import Frontend
from lorad.server.grpc_service import GeneratorService, RequestParseGuard
from lorad.server.metrics import Metrics
from lorad.server.model_thread import ModelThread
from lorad.server.readiness import Readiness

log = logging.getLogger(__name__)

SERVICE_NAME = lorad_pb2.DESCRIPTOR.services_by_name["Generator"].full_name
ADMIN_SERVICE_NAME = lorad_pb2.DESCRIPTOR.services_by_name["AdapterManager"].full_name


class LoradServer:
    def __init__(self, config: ServerConfig, base: LoadedBase | Callable[[], LoadedBase] | None = None):
        """base: a loaded base, or a function that loads one (tests); None loads config.base."""
        self.config = config
        self._preloaded = base
        self.metrics = Metrics()
        self.readiness = Readiness()
        self.frontend = Frontend(config.max_unsent_chunks, on_done=self.metrics.transport_request)
        self.admin = AdapterManagerService(config.adapters_dir, UploadLimits(max_bytes=config.max_upload_bytes),
                                           base=config.base, export_dir=config.export_dir)
        self.service = GeneratorService(config.base.name, self.frontend, listing=self.admin.listing)
        self.health = HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.engine: Engine | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http = None  # lorad.server.http_server.HttpServer with --http-port
        self.http_api = None  # lorad.server.openai_api.OpenAIApi with --http-port
        self.http_port: int | None = None
        self.model_thread = ModelThread()
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Bind, load the base, start the engine; returns the bound gRPC port."""
        cfg = self.config
        policy = policy_from(cfg.admin_token_file, cfg.api_token_file, cfg.host)
        self.server = grpc.aio.server(
            # who may call first (auth), then whether the bytes are a request at all (parse guard)
            interceptors=[AuthInterceptor(policy, on_refusal=self.metrics.request_failed),
                          RequestParseGuard(on_refused=self._count_unparsed)],
            # uploads arrive in chunks of at most 1 MiB, under the request limit (1 MiB at least)
            options=[("grpc.max_receive_message_length", cfg.max_request_bytes)],
        )
        lorad_pb2_grpc.add_GeneratorServicer_to_server(self.service, self.server)
        lorad_pb2_grpc.add_AdapterManagerServicer_to_server(self.admin, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, ADMIN_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self.server,
        )
        address = f"{_bracket(cfg.host)}:{cfg.port}"
        try:
            if cfg.tls:
                self.port = self.server.add_secure_port(
                    address, server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca))
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {address}: {exc} (is the port in use?)") from exc
        if not is_loopback(cfg.host) and not cfg.tls:
            log.warning("listening on %s without TLS: requests and tokens cross the network in clear "
                        "(use --tls-cert/--tls-key, or a TLS proxy in front)", cfg.host)
        if self.admin.publisher is not None:
            for action in self.admin.publisher.recover():
                log.warning("adapters folder: %s", action)
        await self._sync_health()
        await self.server.start()
        log.info("gRPC listening on %s:%d (health NOT_SERVING until the base is loaded)", cfg.host, self.port)
        if cfg.http_port is not None:
            from lorad.server.http_server import HttpServer  # FastAPI/uvicorn only when asked for
            from lorad.server.openai_api import OpenAIApi

            http_host = cfg.http_host or cfg.host
            if not is_loopback(http_host) and not cfg.tls:
                log.warning("HTTP API on %s without TLS: prompts and tokens cross the network in clear", http_host)
            self.http_api = OpenAIApi(self.frontend, self.readiness, policy, listing=self.admin.listing,
                                      base_name=cfg.base.name, observer=self.metrics,
                                      max_concurrency=cfg.http_max_concurrency,
                                      max_body_bytes=cfg.max_request_bytes)
            self.http = HttpServer(self.http_api.app, tls_cert=cfg.tls_cert, tls_key=cfg.tls_key,
                                   tls_client_ca=cfg.tls_client_ca)
            self.http_port = await self.http.start(http_host, cfg.http_port)
            log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1 (/ready 503 until the base is loaded)",
                     "https" if cfg.tls else "http", http_host, self.http_port)
        self.metrics.watch_adapters(lambda: self.engine.residency if self.engine is not None else None,
                                    with_ids=cfg.metrics_adapter_ids)
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(cfg.metrics_host or cfg.host, cfg.metrics_port, self.readiness)
            log.info("Prometheus metrics on http://%s:%d/metrics, probes on /health and /ready",
                     cfg.metrics_host or cfg.host, self.metrics_port)

        # Loading, building and running the engine all happen on one thread (model_thread.py).
        if isinstance(self._preloaded, LoadedBase):
            base = self._preloaded
        else:
            loader = self._preloaded or (lambda: load_base(cfg.base))
            base = await asyncio.wrap_future(self.model_thread.submit(loader))
        self.engine = await asyncio.wrap_future(
            self.model_thread.submit(Engine, base, cfg.engine, cfg.adapters_dir, observer=self.metrics)
        )
        loop = asyncio.get_running_loop()
        # If the engine loop ever ends (a stop, or a fatal error), orchestrators must see it.
        def engine_ended():
            self.readiness.engine_ended()
            asyncio.run_coroutine_threadsafe(self._sync_health(), loop)

        self.engine.on_exit = engine_ended
        self.engine.start(self.model_thread)
        self.metrics.watch_device(base.device)
        self.metrics.memory.labels("kv_cache").set(self.engine.kv.nbytes)
        self.metrics.memory.labels("adapter_slots").set(self.engine.pool.nbytes)
        # the model's own weights plus what the runner keeps beside them (dequantized NF4, head copies)
        self.metrics.memory.labels("base_weights").set(base.model.get_memory_footprint() + self.engine.runner.extra_bytes)
        self.metrics.slots(0, cfg.engine.max_loras)
        self.service.base_name = base.resolved.display_name
        if self.http_api is not None:
            self.http_api.base_name = base.resolved.display_name
        self.frontend.engine = self.engine
        self.admin.base_name = base.resolved.display_name
        self.admin.engine = self.engine
        self.readiness.mark_ready()
        await self._sync_health()
        log.info(
            "serving %s (%s) on %s: up to %d requests at once, %d adapter slots of rank <= %d",
            base.resolved.display_name, base.resolved.quant, base.device, self.engine.max_running,
            cfg.engine.max_loras, cfg.engine.max_lora_rank,
        )
        # which kernels run: on the CPU they depend on its flags and on whether a C compiler built lorad's own
        runner = self.engine.runner
        why = ""
        if runner.device.type == "cpu" and runner.lora_backend == "torch":
            from lorad.kernels import lora_cpu

            why = f" (lorad's C LoRA kernel: {lora_cpu.unavailable_reason() or 'not chosen'})"
        log.info("route: %s; LoRA backend %s%s", runner.route, runner.lora_backend, why)
        return self.port

    def _count_unparsed(self, method: str) -> None:
        if method.startswith(f"/{SERVICE_NAME}/"):
            self.metrics.request_failed("invalid_argument")

    async def _sync_health(self) -> None:
        """gRPC health follows readiness (after a graceful shutdown began, set() is a no-op)."""
        ready = self.readiness.ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME, ADMIN_SERVICE_NAME):
            await self.health.set(service, status)

    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        grace = self.config.grace_seconds if grace is None else grace
        drain = self.config.drain_seconds if drain is None else drain
        was_ready = self.readiness.ready
        self.readiness.begin_drain()
        await self.health.enter_graceful_shutdown()
        try:
            if was_ready and drain > 0:  # keep serving while balancers see /ready fail
                log.info("draining: not ready, still serving new requests for %.1f s", drain)
                await asyncio.sleep(drain)
            stopping = [self.server.stop(grace)] if self.server is not None else []
            if self.http is not None:
                stopping.append(self.http.stop(grace))
            await asyncio.gather(*stopping)
            if self.engine is not None:
                await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)
        finally:
            self.admin.close()
            self.model_thread.shutdown()
            self.metrics.close()
            self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def serve_forever(config: ServerConfig) -> None:
    server = LoradServer(config)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    start = asyncio.ensure_future(server.start())
    done, _ = await asyncio.wait({start, asyncio.ensure_future(stopping.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if start in done:
        start.result()  # raise start-up errors
        await stopping.wait()
    log.info("shutting down: finishing in-flight requests (up to %.0f s after a %.0f s drain)",
             config.grace_seconds, config.drain_seconds)
    start.cancel()
    await server.stop()
    log.info("stopped")
