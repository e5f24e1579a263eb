"""Every lorad client sends the routing key `x-lorad-adapter` and retries UNAVAILABLE (and only that).

The server here is a recording Generator on 127.0.0.1:0: these tests are about what the
clients put on the wire, which a real lorad server ignores (a balancer reads it; see
tests/test_cluster.py for the key doing its job behind HAProxy).
"""

from __future__ import annotations

import asyncio
from concurrent import futures

import grpc
import pytest
from click.testing import CliRunner

from lorad.cli import main
from lorad.clients import ROUTING_HEADER, AsyncClient, Client, LoradRPCError
from lorad.v1 import lorad_pb2, lorad_pb2_grpc


class RecordingGenerator(lorad_pb2_grpc.GeneratorServicer):
    """Answers every call; records (method, adapter_id, routing key); fails the first `fail_first`
    calls of each method with `fail_code`, and can fail a stream after its first chunk."""

    def __init__(self):
        self.calls: list[tuple[str, str, str | None]] = []
        self.fail_first = 0
        self.fail_code = grpc.StatusCode.UNAVAILABLE
        self.fail_stream_after_chunk = False

    def _record(self, method, request, context):
        key = dict(context.invocation_metadata()).get(ROUTING_HEADER)
        self.calls.append((method, request.adapter_id, key))
        if sum(1 for c in self.calls if c[0] == method) <= self.fail_first:
            context.abort(self.fail_code, "replica gone")

    def Generate(self, request, context):
        self._record("Generate", request, context)
        return lorad_pb2.GenerateResponse(text="ok", finish_reason=lorad_pb2.FINISH_REASON_LENGTH)

    def GenerateStream(self, request, context):
        self._record("GenerateStream", request, context)
        yield lorad_pb2.GenerateStreamResponse(chunk=lorad_pb2.TokenChunk(text="o", token_ids=[1]))
        if self.fail_stream_after_chunk:
            context.abort(grpc.StatusCode.UNAVAILABLE, "replica gone mid-stream")
        yield lorad_pb2.GenerateStreamResponse(
            final=lorad_pb2.GenerateResponse(text="o", token_ids=[1], finish_reason=lorad_pb2.FINISH_REASON_LENGTH))


@pytest.fixture()
def recorder():
    servicer = RecordingGenerator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    lorad_pb2_grpc.add_GeneratorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_sync_client_sends_the_adapter_as_routing_key(recorder):
    servicer, target = recorder
    with Client(target, timeout=10) as c:
        c.generate("hi", adapter_id="support-en")
        list(c.stream("hi", adapter_id="legal-de"))
        c.generate("hi")  # the base alone: no key, so a balancer spreads it round-robin
    assert servicer.calls == [
        ("Generate", "support-en", "support-en"),
        ("GenerateStream", "legal-de", "legal-de"),
        ("Generate", "", None),
    ]


def test_async_client_sends_the_adapter_as_routing_key(recorder):
    servicer, target = recorder

    async def main_():
        async with AsyncClient(target, timeout=10) as c:
            await c.generate("hi", adapter_id="a-1")
            async for _ in c.stream("hi", adapter_id="a-2"):
                pass

    asyncio.run(main_())
    assert servicer.calls == [("Generate", "a-1", "a-1"), ("GenerateStream", "a-2", "a-2")]


def test_cli_generate_sends_the_routing_key(recorder):
    servicer, target = recorder
    for extra in ([], ["--stream"]):
        result = CliRunner().invoke(main, ["generate", "--target", target, "--adapter", "demo-a", *extra, "hi"])
        assert result.exit_code == 0, result.output
    assert [c[1:] for c in servicer.calls] == [("demo-a", "demo-a"), ("demo-a", "demo-a")]


def test_unavailable_is_retried_until_a_replica_answers(recorder):
    servicer, target = recorder
    servicer.fail_first = 2
    with Client(target, timeout=10) as c:
        assert c.generate("hi", adapter_id="x").text == "ok"
        assert isinstance(list(c.stream("hi", adapter_id="x"))[-1].text, str)
    assert [c[0] for c in servicer.calls] == ["Generate"] * 3 + ["GenerateStream"] * 3


def test_retries_can_be_turned_off(recorder):
    servicer, target = recorder
    servicer.fail_first = 1
    with Client(target, timeout=10, retries=0) as c, pytest.raises(LoradRPCError) as info:
        c.generate("hi", adapter_id="x")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and len(servicer.calls) == 1


def test_other_errors_are_not_retried(recorder):
    servicer, target = recorder
    servicer.fail_first, servicer.fail_code = 1, grpc.StatusCode.RESOURCE_EXHAUSTED
    with Client(target, timeout=10) as c, pytest.raises(LoradRPCError) as info:
        c.generate("hi", adapter_id="x")
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and len(servicer.calls) == 1


def test_a_stream_that_already_yielded_tokens_is_not_replayed(recorder):
    servicer, target = recorder
    servicer.fail_stream_after_chunk = True
    with Client(target, timeout=10) as c, pytest.raises(LoradRPCError) as info:
        list(c.stream("hi", adapter_id="x"))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and len(servicer.calls) == 1


def test_retries_outside_what_grpc_allows_are_refused():
    with pytest.raises(ValueError, match="retries: 5"):
        Client("127.0.0.1:1", retries=5)
