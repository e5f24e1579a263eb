"""Blocking client: `Client("127.0.0.1:50051").generate("Hi", adapter_id="support-en")`."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

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


class Client:
    """One channel to a lorad server. Every call takes `timeout` seconds (None = no deadline).

    generate / stream accept the GenerateRequest fields as keyword arguments: messages,
    adapter_id, max_new_tokens, temperature, top_p, top_k, seed, repetition_penalty, stop, logprobs.

    token: bearer token sent with every call (default: $LORAD_TOKEN); the admin token for the
    adapter management methods (load_adapter, upload_adapter, ...) on a server that asks for one.
    tls / tls_ca: connect over TLS, verifying the server with tls_ca (a PEM file) or the system's
    roots; client_cert / client_key for servers that require client certificates.

    Generate / GenerateStream send adapter_id also as the `x-lorad-adapter` routing key, and
    retry UNAVAILABLE up to `retries` times (lorad.clients.channel).
    """

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = 300.0,
                 channel: grpc.Channel | None = None, token: str | None = None, tls: bool = False,
                 tls_ca: str | None = None, client_cert: str | None = None, client_key: str | None = None,
                 retries: int = DEFAULT_RETRIES):
        self.target = target
        self.timeout = timeout
        if channel is None:
            if tls or tls_ca or client_cert:
                channel = grpc.secure_channel(target, channel_credentials(tls_ca, client_cert, client_key),
                                              options=channel_options(retries))
            else:
                channel = grpc.insecure_channel(target, options=channel_options(retries))
        self._channel = channel
        self._metadata = call_metadata(resolve_token(token))
        self._stub = lorad_pb2_grpc.GeneratorStub(self._channel)
        self._admin = lorad_pb2_grpc.AdapterManagerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _call(self, method, request, timeout: float | None, adapter_id: str | None = None):
        try:
            return method(request, timeout=timeout or self.timeout,
                          metadata=self._metadata + routing_metadata(adapter_id))
        except grpc.RpcError as err:
            raise LoradRPCError.wrap(err) from None

    # --- inference --------------------------------------------------------------------------

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **fields) -> Completion:
        return Completion.from_proto(self._call(self._stub.Generate, build_request(prompt, **fields), timeout,
                                                fields.get("adapter_id")))

    def stream(self, prompt: str | None = None, *, timeout: float | None = None, **fields) -> Iterator[Chunk | Completion]:
        """Yield Chunk objects as text becomes final, then one Completion with the totals."""
        call = self._stub.GenerateStream(build_request(prompt, **fields), timeout=timeout or self.timeout,
                                         metadata=self._metadata + routing_metadata(fields.get("adapter_id")))
        try:
            for message in call:
                if message.HasField("chunk"):
                    yield Chunk(message.chunk.text, list(message.chunk.token_ids), list(message.chunk.token_logprobs))
                else:
                    yield Completion.from_proto(message.final)
        except grpc.RpcError as err:
            raise LoradRPCError.wrap(err) from None
        finally:
            call.cancel()  # a consumer that stops early frees the server's batch slot

    def list_adapters(self, *, timeout: float | None = None) -> AdapterList:
        """The adapters the server knows (Generator.ListAdapters: needs only an inference token)."""
        return AdapterList.from_proto(self._call(self._stub.ListAdapters, lorad_pb2.ListAdaptersRequest(), timeout))

    # --- adapter management (AdapterManager: admin) -----------------------------------------

    def get_adapter(self, adapter_id: str, *, timeout: float | None = None) -> AdapterInfo:
        return AdapterInfo.from_proto(self._call(self._admin.GetAdapter, lorad_pb2.GetAdapterRequest(id=adapter_id), timeout))

    def load_adapter(self, adapter_id: str, *, pin: bool = False, timeout: float | None = None) -> LoadResult:
        """Bring an adapter into host memory and a device slot now; pin keeps it there."""
        reply = self._call(self._admin.LoadAdapter, lorad_pb2.LoadAdapterRequest(id=adapter_id, pin=pin), timeout)
        return LoadResult(AdapterInfo.from_proto(reply.adapter), reply.host_load_seconds, reply.device_load_seconds)

    def unpin_adapter(self, adapter_id: str, *, timeout: float | None = None) -> AdapterInfo:
        return AdapterInfo.from_proto(self._call(self._admin.UnpinAdapter, lorad_pb2.UnpinAdapterRequest(id=adapter_id), timeout))

    def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> UnloadResult:
        """Free its memory once its running requests finish; the files stay."""
        r = self._call(self._admin.UnloadAdapter, lorad_pb2.UnloadAdapterRequest(id=adapter_id), timeout)
        return UnloadResult(AdapterInfo.from_proto(r.adapter), r.requests_drained, r.seconds, r.freed_host_bytes,
                            r.freed_slot)

    def delete_adapter(self, adapter_id: str, *, timeout: float | None = None) -> DeleteResult:
        """Stop serving it (NOT_FOUND for new requests at once) and remove its folder."""
        r = self._call(self._admin.DeleteAdapter, lorad_pb2.DeleteAdapterRequest(id=adapter_id), timeout)
        return DeleteResult(r.id, r.digest, r.requests_drained, r.seconds)

    def upload_adapter(self, folder: str | Path, adapter_id: str, *, replace: bool = False,
                       timeout: float | None = None) -> UploadResult:
        """Send a PEFT adapter folder; it is validated, then served under adapter_id at once."""
        r = self._call(self._admin.UploadAdapter, upload_messages(folder, adapter_id, replace), timeout)
        return UploadResult(AdapterInfo.from_proto(r.adapter), r.replaced, r.previous_digest, r.bytes_received)

    def combine_adapters(self, inputs, output_id: str, *, method: str = "linear", rank: int | None = None,
                         density: float | None = None, majority_sign_method: str = "", seed: int = 0,
                         replace: bool = False, timeout: float | None = None) -> CombineResult:
        """Combine adapters the server holds (ids, or (id, weight) pairs) into output_id, served at once
        (as `lorad combine`: method, rank, density, majority_sign_method, seed)."""
        request = combine_request(inputs, output_id, method=method, rank=rank, density=density,
                                  majority_sign_method=majority_sign_method, seed=seed, replace=replace)
        return CombineResult.from_proto(self._call(self._admin.CombineAdapters, request, timeout))

    def merge_adapter(self, adapter_id: str, *, format: str = "hf", output_name: str = "", dtype: str = "",
                      outtype: str = "", overwrite: bool = False, timeout: float | None = None) -> MergeResult:
        """Merge an adapter into the base under the server's --export-dir (as `lorad export`), verified."""
        request = lorad_pb2.MergeAdapterRequest(id=adapter_id, format=format, output_name=output_name, dtype=dtype,
                                                outtype=outtype, overwrite=overwrite)
        return MergeResult.from_proto(self._call(self._admin.MergeAdapter, request, timeout))

    def health(self, *, timeout: float = 5.0, service: str = "") -> str:
        """'SERVING', 'NOT_SERVING' or 'UNKNOWN' for the whole server (or one service)."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            raise LoradRPCError.wrap(err) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
