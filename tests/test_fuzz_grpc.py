"""Property-based fuzz of the gRPC surface (hypothesis) against a real server on 127.0.0.1:0.

Each example is a batch of 1-6 concurrent calls: random GenerateRequests (every field drawn
from its whole range, floats included NaN, Inf and subnormals), random and mutated raw bytes on
every method, streams cancelled after a few chunks, tiny deadlines. Every call must end OK or
with an application status carrying a sentence (never UNKNOWN or INTERNAL, never a Python class
name or a server path). After each batch the server is SERVING, a known greedy request returns
the same tokens as before, and /metrics shows nothing running or waiting.

Bounded to about a minute on 2 cores; more examples (and a fresh seed) for a long run:
    LORAD_FUZZ_EXAMPLES=2000 .venv/bin/pytest -s tests/test_fuzz_grpc.py
"""

from __future__ import annotations

import os
import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lorad.clients import Client
from lorad.testing import ServerThread, write_random_adapter
from lorad.v1 import lorad_pb2
from serving_helpers import server_config, wait_gauges_idle

EXAMPLES = int(os.environ.get("LORAD_FUZZ_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=bool(os.environ.get("CI")),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)
KNOWN_PROMPT = "The quick brown fox"

GENERATOR = "/lorad.v1.Generator/"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
METHODS = [GENERATOR + "Generate", GENERATOR + "GenerateStream", GENERATOR + "ListAdapters", HEALTH_CHECK]
# what a hostile call may end with: its own fault (or its own cancel / deadline), with a sentence
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


@pytest.fixture(scope="module")
def fuzz_server(tiny_base, tmp_path_factory, tiny_geometry):
    root = tmp_path_factory.mktemp("fuzz-adapters")
    write_random_adapter(root / "a0", tiny_geometry, rank=4, seed=1, b_std=0.5)
    write_random_adapter(root / "broken", tiny_geometry, rank=4, seed=2)
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"\x10" * 12)
    config = server_config(root, max_seq_len=128, max_new_tokens_limit=32, default_max_new_tokens=4,
                           max_batch_size=8, max_queue=16)
    tally = Counter()
    with ServerThread(config, tiny_base) as srv:
        with Client(f"127.0.0.1:{srv.port}", timeout=30) as client:
            srv.known = client.generate(KNOWN_PROMPT, max_new_tokens=8).token_ids
        srv.root, srv.tally = root, tally
        yield srv
    print(f"\nfuzzed gRPC: {tally['calls']} calls in {tally['batches']} batches "
          f"({tally['raw']} raw byte messages, {tally['cancelled_early']} cancelled mid-stream); outcomes: "
          + ", ".join(f"{k[5:]} {v}" for k, v in sorted(tally.items()) if k.startswith("code:"))
          + f"; leaks found: {tally['leaks']}")


# --- strategies ---------------------------------------------------------------------------------

def sometimes_wild(sane, wild, one_in: int = 5):
    """Mostly in range, so requests get far enough to run; out of range one time in `one_in`."""
    return st.integers(1, one_in).flatmap(lambda n: wild if n == 1 else sane)


any_float32 = st.one_of(st.floats(width=32), st.sampled_from([1e-45, 1e-40, 1e-30, 3e38, -1.0]))
temperatures = sometimes_wild(st.sampled_from([0.0, 0.0, 1e-40, 0.7, 1.0, 2.5]), any_float32)
top_ps = sometimes_wild(st.sampled_from([0.0, 1.0, 0.9, 0.5, 1e-30]), any_float32)
penalties = sometimes_wild(st.sampled_from([0.0, 1.0, 1.3, 1e-40, 1e30]), any_float32)
counts = sometimes_wild(st.integers(0, 12), st.integers(0, 2**32 - 1))
texts = sometimes_wild(
    st.one_of(st.text(min_size=1, max_size=40), st.sampled_from(["Hello", "Once upon a time", "word " * 20, "\u00e9\u4e2d\U0001f600"])),
    st.one_of(st.text(max_size=400), st.sampled_from(["word " * 200, "\x00" * 50, ""])))
adapter_ids = sometimes_wild(st.sampled_from(["", "", "a0", "broken"]),
                             st.one_of(st.sampled_from(["nope", "../x", "a0/..", "a" * 129]), st.text(max_size=20)))
messages = st.lists(st.builds(lorad_pb2.ChatMessage,
                              role=sometimes_wild(st.sampled_from(["user", "system", "assistant"]), st.text(max_size=8)),
                              content=texts), min_size=1, max_size=3)


@st.composite
def generate_requests(draw) -> lorad_pb2.GenerateRequest:
    shape = draw(sometimes_wild(st.sampled_from(["prompt", "prompt", "messages"]), st.sampled_from(["both", "neither"]),
                                one_in=10))
    request = lorad_pb2.GenerateRequest(
        prompt=draw(texts) if shape in ("prompt", "both") else "",
        messages=draw(messages) if shape in ("messages", "both") else [],
        adapter_id=draw(adapter_ids),
        max_new_tokens=draw(counts),
        temperature=draw(temperatures),
        top_p=draw(top_ps),
        top_k=draw(counts),
        repetition_penalty=draw(penalties),
        stop=draw(sometimes_wild(st.lists(st.text(min_size=1, max_size=6), max_size=3),
                                 st.lists(st.text(max_size=300), max_size=20))),
        logprobs=draw(st.booleans()),
    )
    if draw(st.booleans()):
        request.seed = draw(sometimes_wild(st.integers(0, 2**63 - 1), st.integers(0, 2**64 - 1)))
    return request


@st.composite
def raw_messages(draw) -> bytes:
    """Random bytes, or a valid request's bytes after a few random edits."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    data = bytearray(draw(generate_requests()).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        else:
            del data[pos:]
    return bytes(data)


typed_calls = st.tuples(st.just("typed"), st.sampled_from(METHODS[:2]), generate_requests(),
                        st.one_of(st.none(), st.integers(0, 4)),  # cancel a stream after this many chunks
                        sometimes_wild(st.just(30.0), st.sampled_from([0.002, 0.05, 0.3])))  # deadline
raw_calls = st.tuples(st.just("raw"), st.sampled_from(METHODS), raw_messages(), st.none(), st.just(30.0))
# typed requests twice as often as raw bytes
calls = st.sampled_from(["typed", "typed", "raw"]).flatmap(lambda kind: typed_calls if kind == "typed" else raw_calls)


# --- one call, checked --------------------------------------------------------------------------


def _check_status(code: grpc.StatusCode, details: str, root: str, method: str = "") -> None:
    assert code in ALLOWED, (code, details)
    if method == HEALTH_CHECK and code == grpc.StatusCode.NOT_FOUND:
        # the gRPC health protocol's answer for a service name the server does not know: NOT_FOUND,
        # which grpc's own HealthServicer sends without details; lorad's services owe a sentence
        return
    if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
        assert details and len(details) <= 1000, details
        for leak in ("<class", "Traceback", "Unexpected", root):
            assert leak not in details, (code, details)


def _run_call(channel: grpc.Channel, call, root: str, tally: Counter) -> None:
    kind, method, payload, cancel_after, timeout = call
    streaming = method.endswith("GenerateStream")
    if kind == "typed":
        data = payload.SerializeToString()
    else:
        data = payload
        tally["raw"] += 1
    code, details = grpc.StatusCode.OK, ""
    try:
        if streaming:
            stream = channel.unary_stream(method)(data, timeout=timeout)
            for i, _ in enumerate(stream):
                if cancel_after is not None and i >= cancel_after:
                    stream.cancel()
                    tally["cancelled_early"] += 1
                    break
        else:
            channel.unary_unary(method)(data, timeout=timeout)
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
    tally["calls"] += 1
    tally[f"code:{code.name}"] += 1
    _check_status(code, details, root, method)


def _check_server_unharmed(srv) -> None:
    port = srv.server.metrics_port
    gauges = wait_gauges_idle(port)
    if gauges != (0.0, 0.0):
        srv.tally["leaks"] += 1
    assert gauges == (0.0, 0.0), f"requests left running / waiting: {gauges}"
    with Client(f"127.0.0.1:{srv.port}", timeout=30) as client:
        assert client.health() == "SERVING"
        assert client.generate(KNOWN_PROMPT, max_new_tokens=8).token_ids == srv.known


@SETTINGS
@given(batch=st.lists(calls, min_size=1, max_size=6))
# found by the fuzz: the health protocol's NOT_FOUND for an unknown service name carries no details
@example(batch=[("raw", HEALTH_CHECK, health_pb2.HealthCheckRequest(service="nope").SerializeToString(), None, 30.0),
                ("raw", GENERATOR + "Generate", lorad_pb2.GenerateRequest(prompt="Hi", adapter_id="nope")
                 .SerializeToString(), None, 30.0)])
def test_fuzzed_requests_never_harm_the_server(fuzz_server, batch):
    srv = fuzz_server
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    try:
        with ThreadPoolExecutor(len(batch)) as pool:
            for future in [pool.submit(_run_call, channel, call, str(srv.root), srv.tally) for call in batch]:
                future.result()
    finally:
        channel.close()
    srv.tally["batches"] += 1
    _check_server_unharmed(srv)


def test_health_and_listing_answer_during_fuzzed_traffic(fuzz_server):
    """Health and ListAdapters stay quick while hostile calls stream in from other threads."""
    srv = fuzz_server
    stop = threading.Event()
    rng = random.Random(0)

    def traffic():
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        with channel:
            while not stop.is_set():
                request = lorad_pb2.GenerateRequest(prompt="word " * rng.randint(1, 100), max_new_tokens=32,
                                                    temperature=rng.choice([0.0, 1e-40, 1.0]),
                                                    repetition_penalty=rng.choice([0.0, 1e-40, 1e30]),
                                                    adapter_id=rng.choice(["", "a0", "broken"]))
                try:
                    for _ in channel.unary_stream(GENERATOR + "GenerateStream")(request.SerializeToString(), timeout=10):
                        pass
                except grpc.RpcError as err:
                    _check_status(err.code(), err.details() or "", str(srv.root))

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=10) as client:
            for _ in range(10):
                assert client._health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                    health_pb2.HealthCheckResponse.SERVING
                assert {a.id for a in client.list_adapters(timeout=10).adapters} == {"a0", "broken"}
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    _check_server_unharmed(srv)
