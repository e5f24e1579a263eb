"""The adapter manager's tables as a state machine (hypothesis), driven the way the engine drives
them: this test thread plays the model thread (acquire / release / handle), the real loader
thread reads real adapter folders, uploads and deletes go through the real publisher.

After every step: slot refcounts equal running requests + pins, no slot leaks, pins within
max_loras - 1, a running request's slot never changes version, the snapshot agrees."""

from __future__ import annotations

import queue
import shutil
import time

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lorad.errors import AdapterNotFoundError, LimitExceededError
from lorad.geometry import ModelGeometry
from lorad.server.adapter_manager import AdapterManager, Delete, Load, Published, Unload, Unpin
from lorad.server.adapter_publish import AdapterPublisher, adapter_digest
from lorad.server.adapter_store import AdapterStore
from lorad.server.lora_slots import LoRASlotPool
from lorad.testing import write_random_adapter

GEOMETRY = ModelGeometry(num_layers=1, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1,
                         head_dim=8, vocab_size=50, max_position_embeddings=64)
IDS = ("a", "b", "c", "d")
SLOTS = 3


class Harness:
    """A manager with its inbox, as the engine holds it."""

    def __init__(self, root, host_bytes: int | None = None):
        self.root = root
        self.inbox: queue.Queue = queue.Queue()
        self.failed: dict[str, Exception] = {}
        self.store = AdapterStore(root, GEOMETRY, max_rank=8)
        self.pool = LoRASlotPool(GEOMETRY, SLOTS, 8, torch.float32, torch.device("cpu"))
        self.manager = AdapterManager(self.store, self.pool, host_capacity=2, post=self.inbox.put,
                                      fail_waiting=self.failed.__setitem__, host_bytes=host_bytes)
        self.publisher = AdapterPublisher(root)

    def pump(self, timeout: float = 10.0) -> None:
        """Handle inbox messages until no read is in flight (what the engine loop does between steps)."""
        deadline = time.time() + timeout
        while True:
            try:
                self.manager.handle(self.inbox.get(timeout=0.01))
                continue
            except queue.Empty:
                pass
            self.manager.progress()
            self.manager.publish()
            if not self.manager._loading or time.time() > deadline:
                return

    def command(self, command):
        self.manager.handle(command)
        for _ in range(100):
            if command.done.done():
                break
            self.pump()
        self.manager.publish()
        return command.done.result(timeout=0)

    def acquire(self, adapter_id: str):
        """Admit one request: retry while the adapter loads, as the engine does step after step;
        raise what the engine would fail the request with."""
        self.failed.pop(adapter_id, None)
        for attempt in range(50):
            got = self.manager.acquire(adapter_id, first_try=attempt == 0)
            if got is not None:
                return got
            self.pump()
            if adapter_id in self.failed:
                raise self.failed.pop(adapter_id)
        return None


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        import tempfile
        from pathlib import Path

        self.tmp = Path(tempfile.mkdtemp(prefix="lorad-mgr-"))
        self.h = Harness(self.tmp / "adapters")
        self.seed = 0
        self.on_disk: set[str] = set()
        for adapter_id in IDS[:3]:
            self._write(adapter_id)
        self.running: list[tuple[str, int, str]] = []  # (id, slot, digest) of admitted requests

    def _write(self, adapter_id: str) -> str:
        self.seed += 1
        src = write_random_adapter(self.tmp / f"src{self.seed}", GEOMETRY, rank=2 + self.seed % 3, seed=self.seed)
        with self.h.publisher.begin(adapter_id, replace=True) as upload:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                upload.write(name, (src / name).read_bytes())
            published = upload.finish(lambda p: None)
        self.h.publisher.purge(published.previous_trash)
        self.on_disk.add(adapter_id)
        return published.digest

    def teardown(self):
        try:
            self.check_quiescent()
        finally:
            self.h.manager.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    @rule(adapter_id=st.sampled_from(IDS))
    def admit(self, adapter_id):
        if len(self.running) >= 8:
            return
        try:
            got = self.h.acquire(adapter_id)
        except AdapterNotFoundError:
            assert adapter_id not in self.on_disk or adapter_id in self.h.manager.snapshot.deleted
            return
        assert adapter_id in self.on_disk
        if got is not None:  # None: every slot is held by running requests and pins
            slot, digest = got
            assert digest == adapter_digest(self.h.root / adapter_id)  # always the current version
            self.running.append((adapter_id, slot, digest))
        else:
            assert all(r > 0 for r in self.h.pool.refcount)

    @precondition(lambda self: self.running)
    @rule(index=st.integers(min_value=0, max_value=63))
    def finish(self, index):
        _, slot, _ = self.running.pop(index % len(self.running))
        self.h.manager.release(slot)

    @rule(adapter_id=st.sampled_from(IDS), pin=st.booleans())
    def load(self, adapter_id, pin):
        command = Load(adapter_id, pin=pin)
        try:
            report = self.h.command(command)
        except AdapterNotFoundError:
            assert adapter_id not in self.on_disk
            return
        except LimitExceededError:
            assert pin and len(self.h.manager._pinned) == SLOTS - 1
            return
        except TimeoutError:  # never answered: allowed only while every slot is held (running + pins)
            assert all(r > 0 for r in self.h.pool.refcount), \
                f"Load({adapter_id!r}) unanswered with a free slot: refcounts {self.h.pool.refcount}"
            return
        assert report.digest == adapter_digest(self.h.root / adapter_id)

    @rule(adapter_id=st.sampled_from(IDS))
    def unpin(self, adapter_id):
        if adapter_id in self.on_disk:
            self.h.command(Unpin(adapter_id))
            assert adapter_id not in self.h.manager._pinned

    @rule(adapter_id=st.sampled_from(IDS))
    def unload(self, adapter_id):
        if adapter_id not in self.on_disk:
            return
        command = Unload(adapter_id)
        self.h.manager.handle(command)
        self.h.manager.publish()
        holders = [r for r in self.running if r[0] == adapter_id]
        assert command.done.done() == (not holders)  # answered once its running requests are done
        assert adapter_id not in self.h.manager.snapshot.resident or holders

    @rule(adapter_id=st.sampled_from(IDS))
    def replace(self, adapter_id):
        digest = self._write(adapter_id)
        self.h.command(Published(adapter_id, digest=digest))

    @rule(adapter_id=st.sampled_from(IDS))
    def delete(self, adapter_id):
        if adapter_id not in self.on_disk:
            return
        command = Delete(adapter_id)
        self.h.manager.handle(command)
        self.h.manager.publish()
        self.on_disk.discard(adapter_id)
        assert adapter_id in self.h.manager.snapshot.deleted
        out = self.h.publisher.retire(adapter_id)
        self.h.publisher.purge(out)

    @invariant()
    def tables_agree_with_running_requests(self):
        self.h.manager.check_invariants([slot for _, slot, _ in self.running])
        for adapter_id, slot, digest in self.running:  # a running request keeps its version
            assert self.h.manager._slot_digest[slot] == digest
        snapshot = self.h.manager.snapshot
        self.h.manager.publish()
        snapshot = self.h.manager.snapshot
        for adapter_id in {r[0] for r in self.running}:
            assert snapshot.resident[adapter_id].requests_running == sum(1 for r in self.running if r[0] == adapter_id)

    def check_quiescent(self):
        for _, slot, _ in self.running:
            self.h.manager.release(slot)
        self.running.clear()
        self.h.manager.check_invariants([])
        assert not self.h.manager._retired  # no slot leaks once nothing runs
        assert not self.h.manager._drains


# bounded for CI (about 20 s); no shrinking: a failure prints its steps, and shrinking through
# real loader-thread reads can take minutes
ManagerMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=40, deadline=None,
                                            suppress_health_check=list(HealthCheck),
                                            phases=[Phase.explicit, Phase.reuse, Phase.generate])
TestManagerStateMachine = ManagerMachine.TestCase


def test_unload_waits_for_running_requests_then_frees_slot_and_host(tmp_path):
    h = Harness(tmp_path / "adapters")
    write_random_adapter(h.root / "a", GEOMETRY, rank=4, seed=1)
    slot, digest = h.acquire("a")
    assert digest == adapter_digest(h.root / "a")
    unload = Unload("a")
    h.manager.handle(unload)
    h.manager.publish()
    assert not unload.done.done() and h.manager.snapshot.resident["a"].old_versions == 1
    again = h.acquire("a")  # a new request loads the adapter afresh, into another slot
    assert again is not None and again[0] != slot
    h.manager.release(slot)
    report = unload.done.result(timeout=1)
    assert report.requests_drained == 1 and report.freed_slot and report.freed_host_bytes > 0
    h.manager.release(again[0])
    h.manager.check_invariants([])
    h.manager.close()


def test_pins_are_bounded_and_survive_pressure(tmp_path):
    h = Harness(tmp_path / "adapters")
    for i, adapter_id in enumerate(IDS):
        write_random_adapter(h.root / adapter_id, GEOMETRY, rank=2, seed=i)
    for adapter_id in IDS[:2]:
        h.command(Load(adapter_id, pin=True))
    with pytest.raises(LimitExceededError, match="max-loras - 1"):
        h.command(Load("c", pin=True))
    for adapter_id in ("c", "d", "c", "d"):  # traffic through the one unpinned slot
        slot, _ = h.acquire(adapter_id)
        h.manager.release(slot)
    assert {a for a in h.pool.slot_of} >= {"a", "b"}  # pinned ones never evicted
    h.command(Unpin("a"))
    h.command(Load("c", pin=True))
    h.manager.check_invariants([])
    h.manager.close()


def test_loads_waiting_for_a_slot_do_not_thrash_the_host_cache(tmp_path):
    """Every slot held by running requests, more Loads waiting than the host cache holds: no read
    starts until a slot frees (reading then made the waiting Loads evict each other's host copies
    and re-read them from disk every iteration; found by the state machine, seed 11)."""
    h = Harness(tmp_path / "adapters")
    for i, adapter_id in enumerate(IDS + ("e", "f")):
        write_random_adapter(h.root / adapter_id, GEOMETRY, rank=2, seed=i)
    held = [h.acquire(adapter_id)[0] for adapter_id in IDS[:SLOTS]]  # three running requests, three slots
    waiting = [Load(adapter_id) for adapter_id in ("d", "e", "f")]  # 3 > host_capacity 2
    for command in waiting:
        h.manager.handle(command)
    for _ in range(20):
        h.pump()
        assert not h.manager._loading and not any(c.done.done() for c in waiting)
    h.manager.release(held[0])  # one slot frees: the waiting Loads go through it one after another
    for command in waiting:
        for _ in range(100):
            if command.done.done():
                break
            h.pump()
        assert command.done.result(timeout=0).digest == adapter_digest(h.root / command.adapter_id)
    for slot in held[1:]:
        h.manager.release(slot)
    h.manager.check_invariants([])
    h.manager.close()


def test_the_host_cache_holds_at_most_its_bytes_least_recently_used_out_first(tmp_path):
    """host_bytes below two adapters: each read drops the least recently used host copy, but the
    one just read always stays, even when it alone is larger than the budget."""
    for i, adapter_id in enumerate(("a", "b", "big")):
        write_random_adapter(tmp_path / "adapters" / adapter_id, GEOMETRY, rank=8 if adapter_id == "big" else 2,
                             seed=i)
    probe = Harness(tmp_path / "adapters")
    sizes = {}
    for adapter_id in ("a", "b", "big"):
        slot, _ = probe.acquire(adapter_id)
        probe.manager.release(slot)
        sizes[adapter_id] = probe.manager._host[adapter_id].nbytes
    probe.manager.close()
    assert sizes["a"] == sizes["b"] < sizes["big"]

    h = Harness(tmp_path / "adapters", host_bytes=sizes["a"] + sizes["b"] - 1)  # not both: one at a time
    for adapter_id in ("a", "b"):
        slot, _ = h.acquire(adapter_id)
        h.manager.release(slot)
        assert list(h.manager._host) == [adapter_id]
    h.manager.host_bytes = sizes["a"] + sizes["b"]  # both fit, the big one only alone
    assert h.pool.evict("a")  # out of its slot too: the next request reads it from disk again
    slot, _ = h.acquire("a")
    h.manager.release(slot)
    assert list(h.manager._host) == ["b", "a"] and h.manager.snapshot.host_bytes == sizes["a"] + sizes["b"]
    slot, _ = h.acquire("big")  # larger than both together: it stays, alone
    h.manager.release(slot)
    assert list(h.manager._host) == ["big"]
    h.manager.check_invariants([])
    h.manager.close()
