"""Isolation at the gRPC surface of a real server on 127.0.0.1:0: hostile adapter folders,
clients that leave (cancel, deadline, stop reading), and bytes that are not a request. After
each, /metrics shows nothing left running or waiting and other clients get the same answers.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2

from lorad.clients import Client, LoradRPCError
from lorad.testing import ServerThread, write_random_adapter
from lorad.v1 import lorad_pb2, lorad_pb2_grpc
from serving_helpers import engine_gauges, scrape, server_config, wait_for, wait_gauges_idle

MAX_BATCH = 8
MAX_LORAS = 4
UNSENT_LIMIT = 16
# a client whose stream window is tiny and never grows: the server's writes block after ~1 KiB
SMALL_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]


def _edit_config(path, raw_key: str, raw_json: str):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg[raw_key] = "@@RAW@@"
    (path / "adapter_config.json").write_text(json.dumps(cfg).replace('"@@RAW@@"', raw_json))


HOSTILE = {  # adapter id -> how its folder is broken (the findings of issue 8)
    "nan-alpha": lambda p: _edit_config(p, "lora_alpha", "NaN"),
    "deep-config": lambda p: _edit_config(p, "extra", "[" * 100_000 + "]" * 100_000),
    "paren-pattern": lambda p: _edit_config(p, "rank_pattern", '{"(": 8}'),
    "string-alpha": lambda p: _edit_config(p, "alpha_pattern", '{"q_proj": "x"}'),
    "list-pattern": lambda p: _edit_config(p, "rank_pattern", "[1, 2]"),
    "garbage-weights": lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x00" * 7),
    "no-weights": lambda p: (p / "adapter_model.safetensors").unlink(),
}


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, tiny_geometry):
    root = tmp_path_factory.mktemp("hostile-adapters")
    write_random_adapter(root / "good", tiny_geometry, rank=4, seed=1, b_std=0.5)
    for i in range(MAX_LORAS):
        write_random_adapter(root / f"s{i}", tiny_geometry, rank=4, seed=10 + i)
    outside = tmp_path_factory.mktemp("outside")
    write_random_adapter(outside / "secret", tiny_geometry, rank=4, seed=2)
    for name, breakage in HOSTILE.items():
        breakage(write_random_adapter(root / name, tiny_geometry, rank=4, seed=3))
    # a valid adapter whose pattern key backtracks exponentially in Python's re (it froze the server)
    _edit_config(write_random_adapter(root / "catastrophic-pattern", tiny_geometry, rank=4, seed=4),
                 "rank_pattern", json.dumps({r"(\w*\.?\w*)*Z": 8}))
    linked = write_random_adapter(root / "linked-out", tiny_geometry, rank=4, seed=3)
    (linked / "adapter_model.safetensors").unlink()
    (linked / "adapter_model.safetensors").symlink_to(outside / "secret" / "adapter_model.safetensors")
    return root


@pytest.fixture(scope="module")
def server(long_base, adapters_dir):
    config = server_config(adapters_dir, server=dict(max_unsent_chunks=UNSENT_LIMIT, max_request_bytes=4 << 20),
                           max_seq_len=2048, max_batch_size=MAX_BATCH, max_queue=32, max_loras=MAX_LORAS)
    with ServerThread(config, long_base) as srv:
        yield srv


@pytest.fixture()
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
        yield c


def _stub(server, options=None):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=options or [])
    return channel, lorad_pb2_grpc.GeneratorStub(channel)


def _counter(server, name: str) -> float:
    return scrape(server.server.metrics_port).get(name, 0.0)


# --- a hostile adapter harms nobody else ------------------------------------------------------


def test_broken_adapters_are_listed_with_their_error_and_harm_nobody(server, client, adapters_dir):
    reference = client.generate("The quick brown fox", adapter_id="good", max_new_tokens=8).token_ids
    listing = {a.id: a for a in client.list_adapters(timeout=20).adapters}
    assert set(listing) == {"good", "catastrophic-pattern", "linked-out", *HOSTILE} | {f"s{i}" for i in range(MAX_LORAS)}
    assert listing["good"].error == "" and listing["good"].rank == 4
    assert listing["catastrophic-pattern"].error == "" and listing["catastrophic-pattern"].rank == 4
    for name in [*HOSTILE, "linked-out"]:
        assert listing[name].error.startswith(f"adapter '{name}'"), (name, listing[name].error)
        assert str(adapters_dir) not in listing[name].error
    assert "outside the adapters folder" in listing["linked-out"].error
    assert "lora_alpha=nan" in listing["nan-alpha"].error
    for name in [*HOSTILE, "linked-out"]:
        with pytest.raises(LoradRPCError) as info:
            client.generate("hi", adapter_id=name, max_new_tokens=2)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION, (name, info.value)
        assert str(adapters_dir) not in info.value.details
    assert client.health() == "SERVING"
    assert client.generate("hi", adapter_id="catastrophic-pattern", max_new_tokens=4).completion_tokens == 4
    assert client.generate("The quick brown fox", adapter_id="good", max_new_tokens=8).token_ids == reference
    assert len(client.list_adapters(timeout=20).adapters) == len(listing)


def test_client_errors_never_name_server_paths(server, client, adapters_dir):
    with pytest.raises(LoradRPCError) as info:
        client.generate("hi", adapter_id="no-such-adapter")
    assert info.value.code == grpc.StatusCode.NOT_FOUND and info.value.details == "adapter 'no-such-adapter' not found"
    assert str(adapters_dir) not in info.value.details


# --- every client exit frees its resources ----------------------------------------------------


def test_a_client_that_stops_reading_and_then_cancels_frees_its_row(server):
    """The handler is blocked in a write when the cancel comes: the engine request must end
    (finish reason cancelled), not run on to max_new_tokens."""
    port = server.server.metrics_port
    cancelled = _counter(server, 'lorad_requests_total{finish_reason="cancelled"}')
    length = _counter(server, 'lorad_requests_total{finish_reason="length"}')
    channel, stub = _stub(server, SMALL_WINDOW)
    with channel:
        call = stub.GenerateStream(lorad_pb2.GenerateRequest(prompt="Tell me a story", max_new_tokens=2000), timeout=60)
        assert wait_for(lambda: engine_gauges(port)[0] == 1)
        time.sleep(0.3)  # enough for the window to fill and the handler to block
        call.cancel()
        assert wait_gauges_idle(port) == (0.0, 0.0)
    assert _counter(server, 'lorad_requests_total{finish_reason="cancelled"}') == cancelled + 1
    assert _counter(server, 'lorad_requests_total{finish_reason="length"}') == length


def test_a_client_that_never_reads_is_cut_off_with_a_clear_status(server):
    port = server.server.metrics_port
    slow = _counter(server, 'lorad_request_failures_total{kind="slow_client"}')
    channel, stub = _stub(server, SMALL_WINDOW)
    with channel:
        call = stub.GenerateStream(lorad_pb2.GenerateRequest(prompt="Tell me a story", max_new_tokens=2000), timeout=60)
        assert wait_for(lambda: engine_gauges(port)[0] == 1)
        # nobody reads: within the unsent-chunk limit the engine stops working for this client
        assert wait_gauges_idle(port, timeout=30) == (0.0, 0.0)
        assert _counter(server, 'lorad_request_failures_total{kind="slow_client"}') == slow + 1
        chunks = 0
        with pytest.raises(grpc.RpcError) as info:
            for message in call:
                assert message.HasField("chunk")
                chunks += 1
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "did not read its stream" in info.value.details()
        assert UNSENT_LIMIT <= chunks < 2000


def _storm_one(server, rng: random.Random) -> str:
    """One client that leaves early: cancels a stream after k chunks, or lets a deadline pass."""
    channel, stub = _stub(server, SMALL_WINDOW if rng.random() < 0.3 else None)
    with channel:
        request = lorad_pb2.GenerateRequest(prompt="Tell me a story " * rng.randint(1, 20), max_new_tokens=1000,
                                            temperature=rng.choice([0.0, 0.9]), seed=rng.randint(0, 100),
                                            adapter_id=rng.choice(["", "good", "s0", "s1"]))
        kind = rng.choice(["cancel", "cancel", "deadline_stream", "deadline_unary"])
        try:
            if kind == "cancel":
                call = stub.GenerateStream(request, timeout=60)
                for i, _ in enumerate(call):
                    if i >= rng.randint(0, 30):
                        break
                call.cancel()
            elif kind == "deadline_stream":
                for _ in stub.GenerateStream(request, timeout=rng.uniform(0.01, 0.5)):
                    pass
            else:
                stub.Generate(request, timeout=rng.uniform(0.01, 0.5))
        except grpc.RpcError as err:
            assert err.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED), err
    return kind


STORM_CLIENTS = int(os.environ.get("LORAD_STORM_CLIENTS", "60"))


def test_a_storm_of_leaving_clients_leaves_nothing_behind_and_a_full_batch_is_admitted(server, client):
    port = server.server.metrics_port
    reference = client.generate("The quick brown fox", max_new_tokens=8).token_ids
    rng = random.Random(8)
    with ThreadPoolExecutor(12) as pool:
        kinds = list(pool.map(lambda seed: _storm_one(server, random.Random(seed)),
                              [rng.random() for _ in range(STORM_CLIENTS)]))
    assert kinds.count("cancel") >= STORM_CLIENTS // 3
    gauges = wait_gauges_idle(port)
    print(f"\nstorm: {len(kinds)} clients left early ({kinds.count('cancel')} cancelled mid-stream, "
          f"{len(kinds) - kinds.count('cancel')} deadlines); left running / waiting afterwards: {gauges}")
    assert gauges == (0.0, 0.0)
    assert client.health() == "SERVING"
    assert client.generate("The quick brown fox", max_new_tokens=8).token_ids == reference

    # a full batch is admitted at once afterwards: every row came back, and every adapter slot
    # (one request per slot would wait if a leaked reference pinned a slot)
    channels = [_stub(server) for _ in range(MAX_BATCH)]
    calls = [stub.GenerateStream(lorad_pb2.GenerateRequest(prompt="Once upon a time", max_new_tokens=1500,
                                                           adapter_id=f"s{i % MAX_LORAS}"), timeout=60)
             for i, (_, stub) in enumerate(channels)]
    try:
        assert wait_for(lambda: engine_gauges(port) == (MAX_BATCH, 0.0), timeout=20), engine_gauges(port)
    finally:
        for call in calls:
            call.cancel()
        for channel, _ in channels:
            channel.close()
    assert wait_gauges_idle(port) == (0.0, 0.0)


# --- the wire edge --------------------------------------------------------------------------------

_BAD_UTF8_PROMPT = b"\x0a\x02\xff\xfe"  # field 1 (prompt), 2 bytes that are not UTF-8
_BAD_UTF8_ADAPTER = lorad_pb2.GenerateRequest(prompt="hi").SerializeToString() + b"\x1a\x01\xc3"
RAW = {"corrupt": b"\xff\xff\xff\xff", "truncated": b"\x0a\x05hi", "bad_utf8_prompt": _BAD_UTF8_PROMPT,
       "bad_utf8_adapter": _BAD_UTF8_ADAPTER}
METHODS = {  # full method name -> (request streaming?, response streaming?)
    "/lorad.v1.Generator/Generate": False,
    "/lorad.v1.Generator/GenerateStream": True,
    "/lorad.v1.Generator/ListAdapters": False,
    "/grpc.health.v1.Health/Check": False,
}


# bad UTF-8 in fields 1 and 3 only breaks GenerateRequest; for the other request types those
# bytes are a valid message (unknown or bytes fields), so the pair is not a case
CASES = [(method, raw) for method in METHODS for raw in RAW
         if "Generator/Generate" in method or not raw.startswith("bad_utf8")]


@pytest.mark.parametrize(("method", "raw"), CASES)
def test_bytes_that_do_not_parse_are_invalid_argument_with_a_sentence(server, method, raw):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    with channel:
        if METHODS[method]:
            call = channel.unary_stream(method)
            send = lambda data: list(call(data, timeout=10))  # noqa: E731
        else:
            send = lambda data: channel.unary_unary(method)(data, timeout=10)  # noqa: E731
        with pytest.raises(grpc.RpcError) as info:
            send(RAW[raw])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert info.value.details().startswith("the request is not a valid ") and "class" not in info.value.details()


def test_an_oversized_message_is_resource_exhausted_and_a_huge_prompt_is_refused_fast(server, client):
    channel, stub = _stub(server, [("grpc.max_send_message_length", 64 << 20)])
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(lorad_pb2.GenerateRequest(prompt="x" * (5 << 20)), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(LoradRPCError) as err:  # 3.9 MB: within the message limit, refused before tokenizing
        client.generate("word " * 780_000, max_new_tokens=2)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "cannot fit" in err.value.details
    health = health_pb2.HealthCheckRequest(service="")
    assert client._health.Check(health, timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def test_many_messages_and_long_fields_are_refused_with_a_short_sentence(server, client):
    request = lorad_pb2.GenerateRequest(messages=[lorad_pb2.ChatMessage(role="wizard" * 10_000, content="hi")])
    channel, stub = _stub(server)
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(info.value.details()) < 300
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(lorad_pb2.GenerateRequest(prompt="hi", adapter_id="../" * 300_000), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(info.value.details()) < 300
    assert client.health() == "SERVING"


def test_unparsed_requests_are_counted(server):
    before = _counter(server, 'lorad_request_failures_total{kind="invalid_argument"}')
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    with channel, pytest.raises(grpc.RpcError):
        channel.unary_unary("/lorad.v1.Generator/Generate")(b"\xff\xff", timeout=10)
    assert _counter(server, 'lorad_request_failures_total{kind="invalid_argument"}') == before + 1


def test_streams_from_many_threads_all_finish(server, client):
    """Guard: the bounded buffer never cuts off clients that do read."""
    reference = client.generate("Hello there", max_new_tokens=60).token_ids
    outs = []

    def read_all():
        with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
            events = list(c.stream("Hello there", max_new_tokens=60))
            outs.append(([t for e in events[:-1] for t in e.token_ids], events[-1].token_ids))

    threads = [threading.Thread(target=read_all) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outs) == 6 and all(chunks == final == reference for chunks, final in outs)
