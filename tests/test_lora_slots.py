"""The device slot table as a state machine: residency, reference counts, LRU reuse, capacity."""

from __future__ import annotations

import pytest
import torch

from lorad.adapter_format import load_adapter
from lorad.server.lora_slots import LoRASlotPool
from lorad.testing import write_random_adapter


def _adapters(geometry, tmp_path, n, rank=4, **kw):
    return [
        load_adapter(write_random_adapter(tmp_path / f"a{i}", geometry, rank=rank + i, seed=i, **kw), f"a{i}", geometry, 16)
        for i in range(n)
    ]


def test_load_copies_weights_transposed_and_rank_padded(tiny_geometry, tmp_path):
    pool = LoRASlotPool(tiny_geometry, num_slots=2, max_rank=16, dtype=torch.float32, device=torch.device("cpu"))
    (adapter,) = _adapters(tiny_geometry, tmp_path, 1, rank=6)
    slot = pool.acquire_load(adapter)
    m = pool.layers[1]["gate_proj"]
    a, b = adapter.weights[(1, "gate_proj")]
    assert torch.equal(m.a[slot, :6], a) and torch.equal(m.b[slot, :6], b.t())
    assert not m.a[slot, 6:].any() and not m.b[slot, 6:].any()
    assert m.scale[slot].item() == pytest.approx(adapter.spec.modules[(1, "gate_proj")].scale, rel=1e-7)
    assert m.slots_mask == 1 << slot


def test_resident_adapters_are_shared_and_busy_slots_never_evicted(tiny_geometry, tmp_path):
    pool = LoRASlotPool(tiny_geometry, num_slots=2, max_rank=16, dtype=torch.float32, device=torch.device("cpu"))
    a0, a1, a2 = _adapters(tiny_geometry, tmp_path, 3)
    s0 = pool.acquire_load(a0)
    assert pool.acquire_resident("a0") == s0  # a second request shares the slot
    s1 = pool.acquire_load(a1)
    assert s1 != s0
    assert pool.acquire_load(a2) is None  # both slots busy: capacity reached, nothing evicted
    assert pool.lookup("a0") == s0 and pool.lookup("a1") == s1
    pool.release(s0)
    assert pool.acquire_load(a2) is None  # a0 still has one reference
    pool.release(s0)
    assert pool.acquire_load(a2) == s0  # now a0's slot is reused
    assert pool.lookup("a0") is None


def test_least_recently_released_slot_is_reused_first(tiny_geometry, tmp_path):
    pool = LoRASlotPool(tiny_geometry, num_slots=3, max_rank=16, dtype=torch.float32, device=torch.device("cpu"))
    a = _adapters(tiny_geometry, tmp_path, 4)
    slots = [pool.acquire_load(x) for x in a[:3]]
    for s in (slots[1], slots[0], slots[2]):  # release order: a1, a0, a2
        pool.release(s)
    assert pool.acquire_load(a[3]) == slots[1]  # a1 was idle longest
    assert pool.lookup("a1") is None and pool.lookup("a0") == slots[0]


def test_reloading_a_slot_leaves_no_trace_of_the_previous_adapter(tiny_geometry, tmp_path):
    pool = LoRASlotPool(tiny_geometry, num_slots=1, max_rank=16, dtype=torch.float32, device=torch.device("cpu"))
    big = load_adapter(write_random_adapter(tmp_path / "big", tiny_geometry, rank=12, seed=1), "big", tiny_geometry, 16)
    small = load_adapter(
        write_random_adapter(tmp_path / "small", tiny_geometry, rank=2, seed=2, targets=("q_proj",)), "small",
        tiny_geometry, 16)
    pool.release(pool.acquire_load(big))
    slot = pool.acquire_load(small)
    assert pool.layers[0]["down_proj"].slots_mask == 0  # small does not target down_proj
    assert not pool.layers[0]["down_proj"].a[slot].any()
    assert not pool.layers[0]["q_proj"].a[slot, 2:].any()


def test_evict_only_idle_adapters(tiny_geometry, tmp_path):
    pool = LoRASlotPool(tiny_geometry, num_slots=2, max_rank=16, dtype=torch.float32, device=torch.device("cpu"))
    (a0,) = _adapters(tiny_geometry, tmp_path, 1)
    s = pool.acquire_load(a0)
    assert not pool.evict("a0")
    pool.release(s)
    assert pool.evict("a0") and pool.lookup("a0") is None and pool.slots_used == 0


def test_a_failed_slot_write_leaves_the_pool_usable(tiny_geometry, tmp_path, monkeypatch):
    pool = LoRASlotPool(tiny_geometry, num_slots=1, max_rank=16, dtype=torch.float32, device=torch.device("cpu"))
    a0, a1, a2 = _adapters(tiny_geometry, tmp_path, 3)
    pool.release(pool.acquire_load(a0))  # a0 resident and idle: the next load evicts it
    real_write = pool._write

    def failing_write(slot, adapter):
        real_write(slot, adapter)  # half done is the worst case: weights written, then a failure
        raise RuntimeError("device copy failed")

    monkeypatch.setattr(pool, "_write", failing_write)
    with pytest.raises(RuntimeError):
        pool.acquire_load(a1)
    monkeypatch.setattr(pool, "_write", real_write)
    assert pool.lookup("a0") is None and pool.lookup("a1") is None
    assert pool.slots_used == 0 and pool.layers[0]["q_proj"].slots_mask == 0
    slot = pool.acquire_load(a2)  # the slot is reusable, and holds a2 only
    assert pool.lookup("a2") == slot
    a, _ = a2.weights[(0, "q_proj")]
    assert torch.equal(pool.layers[0]["q_proj"].a[slot, : a.shape[0]], a)
