"""The gRPC API against a real server on 127.0.0.1:0 (tiny random base, real adapters on disk)."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

import grpc
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lorad.base_model import BaseModelConfig
from lorad.clients import AsyncClient, Client, Completion, LoradRPCError
from lorad.server.config import EngineConfig, ServerConfig
from lorad.testing import ServerThread, pace_steps, write_random_adapter


def _config(adapters_dir, **engine):
    opts = dict(max_seq_len=256, kv_cache_memory="64MiB", max_lora_rank=16, max_loras=4, max_cpu_loras=8)
    opts.update(engine)
    return ServerConfig(host="127.0.0.1", port=0, metrics_port=0, adapters_dir=str(adapters_dir),
                        base=BaseModelConfig(), engine=EngineConfig(**opts))


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, tiny_geometry):
    root = tmp_path_factory.mktemp("adapters")
    for i in range(2):
        write_random_adapter(root / f"a{i}", tiny_geometry, rank=4 + 4 * i, seed=i, b_std=0.5)
    broken = write_random_adapter(root / "broken", tiny_geometry, rank=4, seed=7)
    tensors = load_file(broken / "adapter_model.safetensors")
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, broken / "adapter_model.safetensors")
    (root / "not-an-adapter").mkdir()
    return root


@pytest.fixture(scope="module")
def server(tiny_base, adapters_dir):
    srv = ServerThread(_config(adapters_dir), tiny_base)
    srv.wait_started()
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
        yield c


def _wait_idle(engine, timeout=10.0):
    deadline = time.time() + timeout
    while (engine._running or engine._waiting or engine._inbox) and time.time() < deadline:
        time.sleep(0.01)
    return not engine._running


def test_health_serving_and_generate_with_and_without_adapter(client):
    assert client.health() == "SERVING"
    base = client.generate("The quick brown fox", max_new_tokens=8)
    a0 = client.generate("The quick brown fox", adapter_id="a0", max_new_tokens=8)
    a1 = client.generate(messages=[{"role": "user", "content": "The quick brown fox"}], adapter_id="a1",
                         max_new_tokens=8)
    assert isinstance(base, Completion) and base.prompt_tokens > 0
    assert base.completion_tokens == len(base.token_ids) <= 8
    assert base.finish_reason in ("length", "eos")
    assert base.token_ids != a0.token_ids  # the adapter changes the output
    assert a1.prompt_tokens > base.prompt_tokens  # the chat template wrapped the message


def test_stream_chunks_then_final(client):
    events = list(client.stream("Once upon a time", adapter_id="a1", max_new_tokens=12, logprobs=True))
    final = events[-1]
    assert isinstance(final, Completion) and all(not isinstance(e, Completion) for e in events[:-1])
    assert "".join(e.text for e in events[:-1]) == final.text
    assert [t for e in events[:-1] for t in e.token_ids] == final.token_ids
    assert len(final.token_logprobs) == len(final.token_ids) and all(lp <= 0 for lp in final.token_logprobs)


def test_list_adapters_reports_location_rank_and_broken_files(client):
    client.generate("hi", adapter_id="a0", max_new_tokens=1)
    listing = client.list_adapters()
    by_id = {a.id: a for a in listing.adapters}
    assert set(by_id) == {"a0", "a1", "broken"}  # "not-an-adapter" has no adapter_config.json
    assert by_id["a0"].location == "device" and by_id["a0"].rank == 4
    assert by_id["a1"].rank == 8 and "q_proj" in by_id["a1"].target_modules and by_id["a1"].size_bytes > 0
    assert listing.max_loras == 4 and listing.max_lora_rank == 16


@pytest.mark.parametrize(
    "kwargs, code, words",
    [
        (dict(prompt="hi", adapter_id="nope"), grpc.StatusCode.NOT_FOUND, "not found"),
        (dict(prompt="hi", adapter_id="../../etc"), grpc.StatusCode.INVALID_ARGUMENT, "not a valid name"),
        (dict(prompt="hi", temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (dict(prompt="hi", top_p=2.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (dict(prompt="hi", max_new_tokens=10**6), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        (dict(prompt="word " * 400), grpc.StatusCode.INVALID_ARGUMENT, "context"),
        (dict(prompt="hi", messages=[{"role": "user", "content": "x"}]), grpc.StatusCode.INVALID_ARGUMENT, "exactly one"),
        (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "exactly one"),
        (dict(messages=[{"role": "robot", "content": "x"}]), grpc.StatusCode.INVALID_ARGUMENT, "role"),
        (dict(prompt="hi", adapter_id="broken"), grpc.StatusCode.FAILED_PRECONDITION, "NaN"),
    ],
)
def test_bad_requests_get_a_status_and_a_sentence(server, client, kwargs, code, words):
    from lorad.clients.types import build_request
    from lorad.v1 import lorad_pb2_grpc

    if kwargs.get("prompt") == "" or ("prompt" in kwargs and "messages" in kwargs):
        # build_request refuses these client-side; send the raw message to test the server
        request = build_request(prompt="x")
        request.prompt = kwargs["prompt"]
        for m in kwargs.get("messages", []):
            request.messages.add(role=m["role"], content=m["content"])
        stub = lorad_pb2_grpc.GeneratorStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(request, timeout=30)
        assert info.value.code() == code and words in info.value.details()
    else:
        with pytest.raises(LoradRPCError) as info:
            client.generate(**{"max_new_tokens": 4, **kwargs})
        assert info.value.code == code and words in info.value.details
    assert client.generate("still alive?", max_new_tokens=2).completion_tokens in (1, 2)


@pytest.fixture()
def paced_engine(server):
    """10 ms more per step: 200 tokens outlast a 0.3 s deadline or a cancel after the first chunk on any machine."""
    undo = pace_steps(server.engine, 0.01)
    yield server.engine
    undo()


def test_client_cancel_frees_the_slot(server, client, paced_engine):
    cancelled = server.server.metrics.requests.labels("cancelled")
    before = cancelled._value.get()
    stream = client.stream("Tell me a story", max_new_tokens=200)
    first = next(stream)
    assert first.token_ids
    stream.close()  # the generator's finally cancels the call
    assert _wait_idle(paced_engine)
    deadline = time.time() + 10  # the count follows the row's release by a moment
    while cancelled._value.get() == before and time.time() < deadline:
        time.sleep(0.01)
    assert cancelled._value.get() == before + 1


def test_deadline_expires_and_frees_the_slot(server, client, paced_engine):
    with pytest.raises(LoradRPCError) as info:
        client.generate("Tell me a story", max_new_tokens=200, timeout=0.3)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_idle(paced_engine)


def test_full_queue_is_resource_exhausted_and_accepted_requests_finish(tiny_base, adapters_dir):
    with ServerThread(_config(adapters_dir, max_queue=1, max_batch_size=1), tiny_base) as srv:
        results, errors = [], []

        def call():
            with Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
                try:
                    results.append(c.generate("Tell me a story", max_new_tokens=40))
                except LoradRPCError as err:
                    errors.append(err)

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors and all(e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in e.details for e in errors)
        assert len(results) >= 2 and all(r.completion_tokens > 0 for r in results)


def test_health_not_serving_until_the_base_is_loaded(tiny_base, adapters_dir):
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return tiny_base

    srv = ServerThread(_config(adapters_dir), slow_loader)
    try:
        deadline = time.time() + 10
        while srv.server.port is None and time.time() < deadline:
            time.sleep(0.01)
        with Client(f"127.0.0.1:{srv.server.port}", timeout=10) as c:
            assert c.health() == "NOT_SERVING"
            with pytest.raises(LoradRPCError) as info:
                c.generate("hi")
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and "loading" in info.value.details
            release.set()
            srv.wait_started()
            assert c.health() == "SERVING"
            assert c.generate("hi", max_new_tokens=2).completion_tokens in (1, 2)
    finally:
        release.set()
        srv.stop()


def test_graceful_shutdown_finishes_in_flight_requests(tiny_base, adapters_dir):
    srv = ServerThread(_config(adapters_dir), tiny_base)
    srv.wait_started()
    pace_steps(srv.engine, 0.02)  # 60 tokens take over 1 s: the stop lands while the request is in flight
    result = []
    with Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
        t = threading.Thread(target=lambda: result.append(c.generate("Tell me a story", max_new_tokens=60)))
        t.start()
        deadline = time.time() + 30
        while not srv.engine._running and time.time() < deadline:
            time.sleep(0.01)
        assert srv.engine._running  # in flight when the stop begins
        srv.stop(grace=30)
        t.join(30)
    assert result and result[0].completion_tokens == 60


def test_async_client(server):
    async def main():
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=60) as c:
            assert await c.health() == "SERVING"
            done = await asyncio.gather(*[c.generate("Hello there", adapter_id=a, max_new_tokens=6)
                                          for a in ("a0", "a1", None)])
            pieces = [e async for e in c.stream("Hello there", max_new_tokens=6)]
            listing = await c.list_adapters()
            return done, pieces, listing

    done, pieces, listing = asyncio.run(main())
    assert len(done) == 3 and len({tuple(d.token_ids) for d in done}) == 3
    assert isinstance(pieces[-1], Completion) and pieces[-1].token_ids == done[2].token_ids
    assert {a.id for a in listing.adapters} >= {"a0", "a1"}


def test_metrics_endpoint_exports_lorad_metrics(server, client):
    client.generate("metrics please", adapter_id="a1", max_new_tokens=4)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
    for name in ("lorad_request_duration_seconds_bucket", "lorad_time_to_first_token_seconds_bucket",
                 "lorad_inter_token_latency_seconds_bucket", "lorad_requests_waiting", "lorad_requests_running",
                 "lorad_batch_size_bucket", "lorad_prompt_tokens_total", "lorad_generation_tokens_total",
                 "lorad_adapter_loads_total", "lorad_adapter_slots_used", "lorad_adapter_cache_hits_total",
                 'lorad_memory_bytes{use="kv_cache"}', "lorad_process_resident_memory_bytes"):
        assert name in text, name
    assert "a1" not in text  # adapter ids never become label values


def test_cli_generate_and_adapters(server):
    from lorad.cli import main

    target = f"127.0.0.1:{server.port}"
    runner = CliRunner()
    out = runner.invoke(main, ["generate", "--target", target, "--adapter", "a0", "--max-new-tokens", "5", "Hello"])
    assert out.exit_code == 0 and out.output.strip()
    streamed = runner.invoke(main, ["generate", "--target", target, "--stream", "--raw", "--max-new-tokens", "5", "Hi"])
    assert streamed.exit_code == 0
    missing = runner.invoke(main, ["generate", "--target", target, "--adapter", "nope", "Hello"])
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.output
    # its NaN is found when it is read: then it is listed INVALID (not only after another test read it)
    broken = runner.invoke(main, ["generate", "--target", target, "--adapter", "broken", "Hello"])
    assert broken.exit_code == 1 and "FAILED_PRECONDITION" in broken.output and "NaN" in broken.output
    listing = runner.invoke(main, ["adapters", "--target", target])
    assert listing.exit_code == 0 and "a0" in listing.output and "INVALID" in listing.output


def test_a_dead_engine_turns_health_not_serving(tiny_base, adapters_dir):
    """Orchestrators restart a server whose engine loop died; they can only see it through health."""
    srv = ServerThread(_config(adapters_dir), tiny_base)
    srv.wait_started()
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=10) as c:
            assert c.health() == "SERVING"
            engine = srv.server.engine

            def broken(*args, **kwargs):
                raise RuntimeError("simulated bug")

            engine._step = broken  # the step fails, then so does failing its requests
            engine._finish_error = broken
            with pytest.raises(LoradRPCError) as info:
                c.generate("hi", max_new_tokens=2)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            deadline = time.time() + 10
            while c.health() != "NOT_SERVING" and time.time() < deadline:
                time.sleep(0.05)
            assert c.health() == "NOT_SERVING"
    finally:
        srv.stop()


def test_tiny_deadlines_are_deadline_exceeded_never_an_empty_success(server, client):
    outcomes = set()
    for _ in range(20):
        try:
            reply = client.generate("Tell me a story", max_new_tokens=50, timeout=0.002)
        except LoradRPCError as err:
            outcomes.add(err.code)
        else:  # a reply within 2 ms must be a real one
            assert reply.finish_reason != "cancelled" and reply.completion_tokens > 0
            outcomes.add("ok")
    assert outcomes <= {grpc.StatusCode.DEADLINE_EXCEEDED, "ok"}
    assert _wait_idle(server.engine)


def test_refused_requests_are_counted_by_kind(server, client):
    failures = server.server.metrics.failures
    before = failures.labels("not_found")._value.get()
    with pytest.raises(LoradRPCError):
        client.generate("hi", adapter_id="no-such-adapter")
    assert failures.labels("not_found")._value.get() == before + 1


@pytest.mark.parametrize("field, value", [("max_new_tokens", -5), ("top_k", -1), ("seed", -1), ("seed", 2**64)])
def test_clients_refuse_out_of_range_fields_before_sending(field, value):
    from lorad.clients.types import build_request

    with pytest.raises(ValueError, match=f"^{field}: "):
        build_request("hi", **{field: value})
