"""asyncio client: `async with AsyncClient(target) as c: await c.generate("Hi", adapter_id=...)`."""

from __future__ import annotations

from typing import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorad.v1 import lorad_pb2, lorad_pb2_grpc

from lorad.clients.channel import DEFAULT_RETRIES, channel_options, routing_metadata
from lorad.clients.types import AdapterList, Chunk, Completion, LoradRPCError, build_request


class AsyncClient:
    """The asyncio twin of lorad.clients.Client, with the same methods, awaited."""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = 300.0,
                 retries: int = DEFAULT_RETRIES):
        self.target = target
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(target, options=channel_options(retries))
        self._stub = lorad_pb2_grpc.GeneratorStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None, **fields) -> Completion:
        try:
            reply = await self._stub.Generate(build_request(prompt, **fields), timeout=timeout or self.timeout,
                                              metadata=routing_metadata(fields.get("adapter_id")))
        except grpc.RpcError as err:
            raise LoradRPCError.wrap(err) from None
        return Completion.from_proto(reply)

    async def stream(self, prompt: str | None = None, *, timeout: float | None = None,
                     **fields) -> AsyncIterator[Chunk | Completion]:
        call = self._stub.GenerateStream(build_request(prompt, **fields), timeout=timeout or self.timeout,
                                         metadata=routing_metadata(fields.get("adapter_id")))
        try:
            async for message in call:
                if message.HasField("chunk"):
                    yield Chunk(message.chunk.text, list(message.chunk.token_ids), list(message.chunk.token_logprobs))
                else:
                    yield Completion.from_proto(message.final)
        except grpc.RpcError as err:
            raise LoradRPCError.wrap(err) from None
        finally:
            call.cancel()

    async def list_adapters(self, *, timeout: float | None = None) -> AdapterList:
        try:
            reply = await self._stub.ListAdapters(lorad_pb2.ListAdaptersRequest(), timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise LoradRPCError.wrap(err) from None
        return AdapterList.from_proto(reply)

    async def health(self, *, timeout: float = 5.0) -> str:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as err:
            raise LoradRPCError.wrap(err) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
