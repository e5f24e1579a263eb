"""Blocking client: `Client("127.0.0.1:50051").generate("Hi", adapter_id="support-en")`."""

from __future__ import annotations

from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorad.v1 import lorad_pb2, lorad_pb2_grpc

from lorad.clients.channel import DEFAULT_RETRIES, channel_options, routing_metadata
from lorad.clients.types import AdapterList, Chunk, Completion, LoradRPCError, build_request


class Client:
    """One channel to a lorad server. Every call takes `timeout` seconds (None = no deadline).

    generate / stream accept the GenerateRequest fields as keyword arguments: messages,
    adapter_id, max_new_tokens, temperature, top_p, top_k, seed, repetition_penalty, stop, logprobs.
    They send adapter_id also as the `x-lorad-adapter` routing key, and retry UNAVAILABLE up to
    `retries` times (lorad.clients.channel).
    """

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = 300.0,
                 channel: grpc.Channel | None = None, retries: int = DEFAULT_RETRIES):
        self.target = target
        self.timeout = timeout
        self._channel = channel or grpc.insecure_channel(target, options=channel_options(retries))
        self._stub = lorad_pb2_grpc.GeneratorStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **fields) -> Completion:
        try:
            reply = self._stub.Generate(build_request(prompt, **fields), timeout=timeout or self.timeout,
                                        metadata=routing_metadata(fields.get("adapter_id")))
        except grpc.RpcError as err:
            raise LoradRPCError.wrap(err) from None
        return Completion.from_proto(reply)

    def stream(self, prompt: str | None = None, *, timeout: float | None = None, **fields) -> Iterator[Chunk | Completion]:
        """Yield Chunk objects as text becomes final, then one Completion with the totals."""
        call = self._stub.GenerateStream(build_request(prompt, **fields), timeout=timeout or self.timeout,
                                         metadata=routing_metadata(fields.get("adapter_id")))
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
        try:
            reply = self._stub.ListAdapters(lorad_pb2.ListAdaptersRequest(), timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise LoradRPCError.wrap(err) from None
        return AdapterList.from_proto(reply)

    def health(self, *, timeout: float = 5.0) -> str:
        """'SERVING', 'NOT_SERVING' or 'UNKNOWN' for the whole server."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as err:
            raise LoradRPCError.wrap(err) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
