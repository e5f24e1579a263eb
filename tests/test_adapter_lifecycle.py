"""Adapter management on a real server on 127.0.0.1:0 (tiny random base): load, pin, unload,
delete and versioned replace, under traffic; a seeded random walk of all of them with
generate, cancel and deadline-expired requests."""

from __future__ import annotations

import random
import shutil
import threading
import time

import grpc
import pytest

from lorad.base_model import BaseModelConfig
from lorad.clients import Client, Completion, LoradRPCError
from lorad.server.adapter_publish import adapter_digest
from lorad.server.config import EngineConfig, ServerConfig
from lorad.testing import ServerThread, write_random_adapter

PROMPT = "Once upon a time, in a land far away"


def _config(root, **engine):
    opts = dict(max_seq_len=128, kv_cache_memory="64MiB", max_lora_rank=8, max_loras=3, max_cpu_loras=4,
                max_batch_size=24)
    opts.update(engine)
    return ServerConfig(host="127.0.0.1", port=0, metrics_port=None, adapters_dir=str(root),
                        base=BaseModelConfig(), engine=EngineConfig(**opts))


def _wait_idle(engine, timeout=20.0):
    deadline = time.time() + timeout
    while (engine._running or engine._waiting or engine._inbox or engine._messages) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # let the loop publish its last snapshot
    return not engine._running


@pytest.fixture()
def server(tiny_base, tiny_geometry, tmp_path):
    root = tmp_path / "adapters"
    for i, name in enumerate(("a", "b", "c")):
        write_random_adapter(root / name, tiny_geometry, rank=4, seed=i, b_std=0.5)
    with ServerThread(_config(root), tiny_base) as srv:
        srv.root = root
        srv.target = f"127.0.0.1:{srv.port}"
        yield srv


def test_load_pin_unpin_and_their_errors(server, tiny_geometry):
    with Client(server.target, timeout=30) as c:
        loaded = c.load_adapter("a", pin=True)
        assert loaded.adapter.location == "device" and loaded.adapter.pinned
        assert loaded.adapter.digest == adapter_digest(server.root / "a")
        assert loaded.host_load_seconds > 0 and loaded.device_load_seconds > 0
        again = c.load_adapter("a")  # already there: no tier crossed
        assert again.host_load_seconds == 0 and again.device_load_seconds == 0
        c.load_adapter("b", pin=True)
        with pytest.raises(LoradRPCError) as too_many:
            c.load_adapter("c", pin=True)  # 3 slots: at most 2 pinned
        assert too_many.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "unpin" in too_many.value.details
        for _ in range(3):  # unpinned traffic still gets the third slot
            assert c.generate(PROMPT, adapter_id="c", max_new_tokens=2).completion_tokens >= 1
        listing = {a.id: a for a in c.list_adapters().adapters}
        assert listing["a"].pinned and listing["b"].pinned and not listing["c"].pinned
        assert c.list_adapters().max_pinned == 2
        assert not c.unpin_adapter("a").pinned
        c.load_adapter("c", pin=True)
        for bad, code in (("nope", grpc.StatusCode.NOT_FOUND), ("../x", grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(LoradRPCError) as info:
                c.load_adapter(bad)
            assert info.value.code == code
        broken = write_random_adapter(server.root / "broken", tiny_geometry, rank=4, seed=9)
        (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
        with pytest.raises(LoradRPCError) as info:
            c.load_adapter("broken")
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    server.engine.adapters.check_invariants([]) if _wait_idle(server.engine) else None


def _stream_collect(target, adapter_id, n, out, started):
    with Client(target, timeout=60) as c:
        pieces = []
        for piece in c.stream(PROMPT, adapter_id=adapter_id, max_new_tokens=n):
            pieces.append(piece)
            if len(pieces) == 1:
                started.release()
        out.append(pieces[-1])


def test_replace_under_traffic_never_mixes_versions(server, tiny_geometry, tmp_path):
    v2 = write_random_adapter(tmp_path / "v2", tiny_geometry, rank=4, seed=77, b_std=0.5)
    with Client(server.target, timeout=60) as c:
        ref1 = c.generate(PROMPT, adapter_id="a", max_new_tokens=24)
        digest1 = ref1.adapter_version
        assert digest1 == adapter_digest(server.root / "a")
        results: list[Completion] = []
        started = threading.Semaphore(0)
        threads = [threading.Thread(target=_stream_collect, args=(server.target, "a", 24, results, started))
                   for _ in range(20)]
        for t in threads:
            t.start()
        for _ in threads:  # every stream has its first token: all 20 are running on version 1
            assert started.acquire(timeout=60)
        replaced = c.upload_adapter(v2, "a", replace=True)
        assert replaced.replaced and replaced.previous_digest == digest1
        digest2 = replaced.adapter.digest
        late = [c.generate(PROMPT, adapter_id="a", max_new_tokens=24) for _ in range(3)]
        for t in threads:
            t.join(60)
        ref2 = c.generate(PROMPT, adapter_id="a", max_new_tokens=24)
    assert ref2.adapter_version == digest2 != digest1 and ref2.token_ids != ref1.token_ids
    expected = {digest1: ref1.token_ids, digest2: ref2.token_ids}
    assert len(results) == 20
    for r in results:  # admitted before the replace: version 1, token for token
        assert r.adapter_version == digest1 and r.token_ids == ref1.token_ids
    for r in late:
        assert r.adapter_version == digest2 and r.token_ids == expected[digest2]
    assert _wait_idle(server.engine)
    snapshot = server.engine.adapters.snapshot
    assert snapshot.resident["a"].old_versions == 0  # version 1 freed with its last request
    server.engine.adapters.check_invariants([])


def test_unload_under_traffic_then_memory_is_free(server):
    manager = server.engine.adapters
    with Client(server.target, timeout=60) as c:
        c.load_adapter("b")
        out, started = [], threading.Semaphore(0)
        t = threading.Thread(target=_stream_collect, args=(server.target, "b", 60, out, started))
        t.start()
        assert started.acquire(timeout=60)
        result = c.unload_adapter("b")  # answers once the running stream has finished
        assert result.requests_drained == 1 and result.freed_slot and result.freed_host_bytes > 0
        t.join(30)
        assert out[0].completion_tokens == 60 and out[0].finish_reason == "length"  # not cut short
        info = c.get_adapter("b")
        assert info.location == "disk" and info.requests_running == 0 and info.old_versions_resident == 0
        assert "b" not in manager.snapshot.resident and "b" not in server.engine.pool.slot_of
        loads = server.server.metrics.adapter_loads.labels("host")._value.get()
        assert c.generate(PROMPT, adapter_id="b", max_new_tokens=2).completion_tokens >= 1  # files stayed
        assert server.server.metrics.adapter_loads.labels("host")._value.get() == loads + 1  # read again
    assert _wait_idle(server.engine)
    manager.check_invariants([])


def test_delete_refuses_new_requests_at_once_and_running_ones_finish(server):
    with Client(server.target, timeout=60) as c:
        out, started = [], threading.Semaphore(0)
        t = threading.Thread(target=_stream_collect, args=(server.target, "c", 80, out, started))
        t.start()
        assert started.acquire(timeout=60)
        deleted = []
        d = threading.Thread(target=lambda: deleted.append(c.delete_adapter("c")))
        d.start()
        deadline = time.time() + 10
        while "c" not in server.engine.adapters.snapshot.deleted and time.time() < deadline:
            time.sleep(0.005)
        with pytest.raises(LoradRPCError) as info:
            c.generate(PROMPT, adapter_id="c", max_new_tokens=2)
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert t.is_alive() or out  # the running stream was not cut
        t.join(60)
        d.join(60)
        assert out[0].completion_tokens == 80 and deleted[0].requests_drained == 1
        assert not (server.root / "c").exists() and "c" not in {a.id for a in c.list_adapters().adapters}
    assert _wait_idle(server.engine)
    server.engine.adapters.check_invariants([])


def test_random_walk_of_management_and_traffic(server, tiny_geometry, tmp_path):
    """160 operations from a seeded random walk (the manager-level state machine, tests/test_adapter_manager.py, runs a thousand); after each, at a quiet moment, the
    slot table agrees with the (no longer) running requests and the listing with the snapshot."""
    rng = random.Random(1234)
    manager, engine = server.engine.adapters, server.engine
    ids = ["a", "b", "c", "d"]
    sources = [write_random_adapter(tmp_path / f"v{i}", tiny_geometry, rank=2 + i % 3, seed=100 + i) for i in range(4)]
    background: list[threading.Thread] = []
    counts: dict[str, int] = {}
    with Client(server.target, timeout=30) as c:
        for step in range(160):
            op = rng.choice(["generate", "stream_cancel", "deadline", "load", "pin", "unpin", "unload", "replace"])
            adapter_id = rng.choice(ids)
            counts[op] = counts.get(op, 0) + 1
            try:
                if op == "generate":
                    r = c.generate(PROMPT, adapter_id=adapter_id, max_new_tokens=rng.randint(1, 6))
                    assert r.adapter_version == adapter_digest(server.root / adapter_id)
                elif op == "stream_cancel":
                    stream = c.stream(PROMPT, adapter_id=adapter_id, max_new_tokens=50)
                    next(stream)
                    stream.close()
                elif op == "deadline":
                    with pytest.raises(LoradRPCError) as info:
                        c.generate(PROMPT, adapter_id=adapter_id, max_new_tokens=100, timeout=0.05)
                    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
                elif op in ("load", "pin"):
                    c.load_adapter(adapter_id, pin=op == "pin")
                elif op == "unpin":
                    c.unpin_adapter(adapter_id)
                elif op == "unload":
                    t = threading.Thread(target=c.unload_adapter, args=(adapter_id,))
                    t.start()
                    background.append(t)
                elif op == "replace":
                    c.upload_adapter(rng.choice(sources), adapter_id, replace=True)
            except LoradRPCError as err:
                allowed = {grpc.StatusCode.NOT_FOUND: adapter_id == "d" and not (server.root / "d").exists(),
                           grpc.StatusCode.RESOURCE_EXHAUSTED: op == "pin"}
                assert allowed.get(err.code), f"step {step} {op} {adapter_id}: {err}"
            if step % 10 == 9:
                for t in background:
                    t.join(30)
                background.clear()
                assert _wait_idle(engine)
                manager.check_invariants([])
                listing = {a.id: a for a in c.list_adapters().adapters}
                snapshot = manager.snapshot
                for adapter_id, info in listing.items():
                    here = snapshot.resident.get(adapter_id)
                    assert info.requests_running == 0 and info.old_versions_resident == 0
                    assert info.pinned == bool(here and here.pinned)
                    if info.location != "disk":
                        assert info.digest == adapter_digest(server.root / adapter_id)
                assert manager.snapshot.pinned <= 2
            if step == 80 and not (server.root / "d").exists():  # the fourth id appears by hand at the latest
                shutil.copytree(sources[0], server.root / "d")
    assert min(counts.values()) >= 10, counts
