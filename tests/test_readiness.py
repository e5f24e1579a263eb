"""Readiness and liveness probes, draining, and the adapter-residency metrics, on a real server.

Real lorad server on 127.0.0.1:0 (tiny random base, adapters on disk), probes over real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest

from lorad.base_model import BaseModelConfig
from lorad.clients import Client, LoradRPCError
from lorad.server.config import EngineConfig, ServerConfig
from lorad.server.readiness import Readiness
from lorad.testing import ServerThread, pace_steps, write_random_adapter


def _config(adapters_dir, **server):
    engine = EngineConfig(max_seq_len=256, kv_cache_memory="64MiB", max_lora_rank=8, max_loras=2, max_cpu_loras=4)
    return ServerConfig(host="127.0.0.1", port=0, metrics_port=0, adapters_dir=str(adapters_dir),
                        base=BaseModelConfig(), engine=engine, **server)


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, tiny_geometry):
    root = tmp_path_factory.mktemp("adapters")
    for i in range(3):
        write_random_adapter(root / f"a{i}", tiny_geometry, rank=4, seed=i)
    return root


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _wait_for(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_readiness_states_never_turn_back():
    r = Readiness()
    assert (r.live, r.ready) == (True, False)
    r.mark_ready()
    assert r.probe("/ready")[0] == 200 and json.loads(r.probe("/ready")[1])["status"] == "ready"
    r.begin_drain()
    r.mark_ready()  # a draining server never becomes ready again
    assert (r.state, r.probe("/ready")[0], r.probe("/health")[0]) == ("draining", 503, 200)
    r.engine_ended()  # expected while draining: still live
    assert r.live
    failed = Readiness()
    failed.mark_ready()
    failed.engine_ended()  # not draining: the engine died
    assert (failed.state, failed.probe("/health")[0], failed.probe("/ready")[0]) == ("failed", 503, 503)
    with pytest.raises(ValueError, match="path"):
        r.probe("/metrics")


def test_not_ready_while_loading_then_ready(tiny_base, adapters_dir):
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return tiny_base

    srv = ServerThread(_config(adapters_dir), slow_loader)
    try:
        assert _wait_for(lambda: srv.server.metrics_port is not None)
        port = srv.server.metrics_port
        status, body = _get(port, "/ready")
        assert status == 503 and json.loads(body)["status"] == "starting"
        assert _get(port, "/health")[0] == 200  # loading is not a failure: liveness must not restart it
        release.set()
        srv.wait_started()
        status, body = _get(port, "/ready")
        assert status == 200 and json.loads(body) | {"since": 0} == {"status": "ready", "ok": True, "since": 0}
        assert "lorad_requests_running" in _get(port, "/metrics")[1]  # the same port still serves metrics
    finally:
        release.set()
        srv.stop()


def test_drain_keeps_serving_then_refuses_and_finishes_in_flight(tiny_base, adapters_dir):
    srv = ServerThread(_config(adapters_dir), tiny_base)
    srv.wait_started()
    port, target = srv.server.metrics_port, f"127.0.0.1:{srv.port}"
    pace_steps(srv.engine, 0.02)
    in_flight = []
    with Client(target, timeout=60, retries=0) as c:
        long = threading.Thread(target=lambda: in_flight.append(
            c.generate("Tell me a story", adapter_id="a0", max_new_tokens=120)))
        long.start()
        assert _wait_for(lambda: srv.engine.residency.running == ("a0",))
        stopping = asyncio.run_coroutine_threadsafe(srv.server.stop(grace=30, drain=1.5), srv.loop)
        assert _wait_for(lambda: _get(port, "/ready")[0] == 503, timeout=1.0)
        assert c.health() == "NOT_SERVING"
        during_drain = c.generate("Hello", max_new_tokens=3)  # balancers have not noticed yet: still served
        assert during_drain.completion_tokens > 0
        assert _wait_for(lambda: not _accepts(c), timeout=5.0)  # after the drain: refused
        long.join(60)
        stopping.result(60)
    assert in_flight and in_flight[0].completion_tokens == 120  # the in-flight request ran to the end
    srv.loop.call_soon_threadsafe(srv.loop.stop)


def _accepts(client) -> bool:
    try:
        client.generate("Hello", max_new_tokens=1, timeout=2)
        return True
    except LoradRPCError as err:
        # lorad refuses with UNAVAILABLE; once grpc's own stop(grace) has begun, grpc itself
        # cancels a new call (CANCELLED), which is a refusal too
        assert err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), err
        return False


def test_a_dead_engine_fails_liveness(tiny_base, adapters_dir):
    srv = ServerThread(_config(adapters_dir), tiny_base)
    srv.wait_started()
    try:
        port = srv.server.metrics_port
        assert _get(port, "/health")[0] == 200
        engine = srv.engine

        def broken(*args, **kwargs):
            raise RuntimeError("simulated bug")

        engine._step = broken
        engine._finish_error = broken
        with Client(f"127.0.0.1:{srv.port}", timeout=10, retries=0) as c, pytest.raises(LoradRPCError):
            c.generate("hi", max_new_tokens=2)
        assert _wait_for(lambda: _get(port, "/health")[0] == 503)
        assert json.loads(_get(port, "/health")[1])["status"] == "failed" and _get(port, "/ready")[0] == 503
    finally:
        srv.stop()


def _metric_lines(port: int, name: str) -> list[str]:
    return [line for line in _get(port, "/metrics")[1].splitlines() if line.startswith(name + "{")]


def test_residency_by_id_only_with_the_flag(tiny_base, adapters_dir):
    srv = ServerThread(_config(adapters_dir, metrics_adapter_ids=True), tiny_base)
    srv.wait_started()
    try:
        port = srv.server.metrics_port
        assert _metric_lines(port, "lorad_adapter_resident") == []
        with Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
            for a in ("a0", "a1", "a2"):  # 2 device slots: a0 is evicted from its slot by a2
                c.generate("Hello", adapter_id=a, max_new_tokens=2)
            resident = set(_metric_lines(port, "lorad_adapter_resident"))
            assert resident == {
                'lorad_adapter_resident{adapter_id="a1",tier="device"} 1.0',
                'lorad_adapter_resident{adapter_id="a2",tier="device"} 1.0',
                'lorad_adapter_resident{adapter_id="a0",tier="host"} 1.0',
                'lorad_adapter_resident{adapter_id="a1",tier="host"} 1.0',
                'lorad_adapter_resident{adapter_id="a2",tier="host"} 1.0',
            }
            [idle] = _metric_lines(port, "lorad_lora_requests_info")
            assert idle.startswith('lorad_lora_requests_info{max_lora="2",running_lora_adapters="",'
                                   'waiting_lora_adapters=""}')
            assert abs(float(idle.split()[-1]) - time.time()) < 60  # the value is the snapshot's time
            pace_steps(srv.engine, 0.02)
            busy = threading.Thread(target=lambda: c.generate("Hello", adapter_id="a1", max_new_tokens=60))
            busy.start()
            assert _wait_for(lambda: 'running_lora_adapters="a1"' in "".join(
                _metric_lines(port, "lorad_lora_requests_info")))
            busy.join(60)
    finally:
        srv.stop()


def test_residency_counts_without_ids_by_default(tiny_base, adapters_dir):
    srv = ServerThread(_config(adapters_dir), tiny_base)
    srv.wait_started()
    try:
        port = srv.server.metrics_port
        with Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
            c.generate("Hello", adapter_id="a0", max_new_tokens=2)
        assert sorted(_metric_lines(port, "lorad_adapters_resident")) == [
            'lorad_adapters_resident{tier="device"} 1.0', 'lorad_adapters_resident{tier="host"} 1.0']
        text = _get(port, "/metrics")[1]
        assert "a0" not in text and "lorad_lora_requests_info" not in text
    finally:
        srv.stop()
