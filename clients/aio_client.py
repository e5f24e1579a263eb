"""asyncio client: `async with AsyncClient(target) as c: await c.generate("Hi", adapter_id=...)`."""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorad.v1 import lorad_pb2, lorad_pb2_grpc

from lorad.clients.channel import DEFAULT_RETRIES, channel_options, routing_metadata
from lorad.clients.types import (
    AdapterInfo,
    AdapterList,
    Chunk,
    CombineResult,
    Completion,
    DeleteResult,
    LoadResult,
    LoradRPCError,
    MergeResult,
    UnloadResult,
    UploadResult,
    build_request,
    call_metadata,
    channel_credentials,
    combine_request,
    resolve_token,
    upload_messages,
)


class AsyncClient:
    """The asyncio twin of lorad.clients.Client, with the same methods and options, awaited."""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = 300.0, token: str | None = None,
                 tls: bool = False, tls_ca: str | None = None, client_cert: str | None = None,
                 client_key: str | None = None, retries: int = DEFAULT_RETRIES):
        self.target = target
        self.timeout = timeout
        if tls or tls_ca or client_cert:
            self._channel = grpc.aio.secure_channel(target, channel_credentials(tls_ca, client_cert, client_key),
                                                    options=channel_options(retries))
        else:
            self._channel = grpc.aio.insecure_channel(target, options=channel_options(retries))
        self._metadata = call_metadata(resolve_token(token))
        self._stub = lorad_pb2_grpc.GeneratorStub(self._channel)
        self._admin = lorad_pb2_grpc.AdapterManagerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def _call(self, method, request, timeout: float | None, adapter_id: str | None = None):
        try:
            return await method(request, timeout=timeout or self.timeout,
                                metadata=self._metadata + routing_metadata(adapter_id))
        except grpc.RpcError as err:
            raise LoradRPCError.wrap(err) from None

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None, **fields) -> Completion:
        return Completion.from_proto(await self._call(self._stub.Generate, build_request(prompt, **fields), timeout,
                                                      fields.get("adapter_id")))

    async def stream(self, prompt: str | None = None, *, timeout: float | None = None,
                     **fields) -> AsyncIterator[Chunk | Completion]:
        call = self._stub.GenerateStream(build_request(prompt, **fields), timeout=timeout or self.timeout,
                                         metadata=self._metadata + routing_metadata(fields.get("adapter_id")))
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
        return AdapterList.from_proto(await self._call(self._stub.ListAdapters, lorad_pb2.ListAdaptersRequest(), timeout))

    async def get_adapter(self, adapter_id: str, *, timeout: float | None = None) -> AdapterInfo:
        return AdapterInfo.from_proto(
            await self._call(self._admin.GetAdapter, lorad_pb2.GetAdapterRequest(id=adapter_id), timeout))

    async def load_adapter(self, adapter_id: str, *, pin: bool = False, timeout: float | None = None) -> LoadResult:
        r = await self._call(self._admin.LoadAdapter, lorad_pb2.LoadAdapterRequest(id=adapter_id, pin=pin), timeout)
        return LoadResult(AdapterInfo.from_proto(r.adapter), r.host_load_seconds, r.device_load_seconds)

    async def unpin_adapter(self, adapter_id: str, *, timeout: float | None = None) -> AdapterInfo:
        return AdapterInfo.from_proto(
            await self._call(self._admin.UnpinAdapter, lorad_pb2.UnpinAdapterRequest(id=adapter_id), timeout))

    async def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> UnloadResult:
        r = await self._call(self._admin.UnloadAdapter, lorad_pb2.UnloadAdapterRequest(id=adapter_id), timeout)
        return UnloadResult(AdapterInfo.from_proto(r.adapter), r.requests_drained, r.seconds, r.freed_host_bytes,
                            r.freed_slot)

    async def delete_adapter(self, adapter_id: str, *, timeout: float | None = None) -> DeleteResult:
        r = await self._call(self._admin.DeleteAdapter, lorad_pb2.DeleteAdapterRequest(id=adapter_id), timeout)
        return DeleteResult(r.id, r.digest, r.requests_drained, r.seconds)

    async def upload_adapter(self, folder: str | Path, adapter_id: str, *, replace: bool = False,
                             timeout: float | None = None) -> UploadResult:
        # the files are read as the stream is sent: a few 1 MiB reads, off the hot path of any loop
        r = await self._call(self._admin.UploadAdapter, upload_messages(folder, adapter_id, replace), timeout)
        return UploadResult(AdapterInfo.from_proto(r.adapter), r.replaced, r.previous_digest, r.bytes_received)

    async def combine_adapters(self, inputs, output_id: str, *, method: str = "linear", rank: int | None = None,
                         density: float | None = None, majority_sign_method: str = "", seed: int = 0,
                         replace: bool = False, timeout: float | None = None) -> CombineResult:
        """Combine adapters the server holds (ids, or (id, weight) pairs) into output_id, served at once
        (as `lorad combine`: method, rank, density, majority_sign_method, seed)."""
        request = combine_request(inputs, output_id, method=method, rank=rank, density=density,
                                  majority_sign_method=majority_sign_method, seed=seed, replace=replace)
        return CombineResult.from_proto(await self._call(self._admin.CombineAdapters, request, timeout))

    async def merge_adapter(self, adapter_id: str, *, format: str = "hf", output_name: str = "", dtype: str = "",
                      outtype: str = "", overwrite: bool = False, timeout: float | None = None) -> MergeResult:
        """Merge an adapter into the base under the server's --export-dir (as `lorad export`), verified."""
        request = lorad_pb2.MergeAdapterRequest(id=adapter_id, format=format, output_name=output_name, dtype=dtype,
                                                outtype=outtype, overwrite=overwrite)
        return MergeResult.from_proto(await self._call(self._admin.MergeAdapter, request, timeout))

    async def health(self, *, timeout: float = 5.0, service: str = "") -> str:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            raise LoradRPCError.wrap(err) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
