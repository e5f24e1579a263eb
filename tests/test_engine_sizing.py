"""The engine sizes its KV cache from the base and the batch shape unless told a budget, and runs
its model thread on the number of torch threads it was given (server/config.py, engine.py)."""

from __future__ import annotations

import pytest
import torch

from lorad.cpu_features import default_threads, usable_cores
from lorad.errors import ConfigError
from lorad.server.config import EngineConfig
from lorad.server.engine import Engine
from lorad.server.sampling import SamplingParams


def test_kv_cache_is_sized_from_the_base_by_default(tiny_base, tiny_geometry):
    engine = Engine(tiny_base, EngineConfig(max_seq_len=128, max_batch_size=5))
    assert engine.max_running == 5
    row = tiny_geometry.kv_bytes_per_token(4) * 128  # float32 cache
    assert engine.kv.nbytes == 5 * row
    # an explicit budget still wins, and lowers the batch to what fits
    small = Engine(tiny_base, EngineConfig(max_seq_len=128, max_batch_size=5, kv_cache_memory=3 * row))
    assert small.max_running == 3 and small.kv.nbytes == 3 * row


def test_engine_runs_on_the_threads_it_was_given(tiny_base):
    before = torch.get_num_threads()
    seen = []
    try:
        engine = Engine(tiny_base, EngineConfig(max_seq_len=64, max_batch_size=2, threads=1))
        engine.runner.forward = (lambda f: lambda batch: (seen.append(torch.get_num_threads()), f(batch))[1])(
            engine.runner.forward)
        with engine:
            engine.generate(engine.encode(prompt="Hi"), SamplingParams(max_new_tokens=2))
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}
    assert Engine(tiny_base, EngineConfig(max_seq_len=64, max_batch_size=1)).threads == default_threads()
    assert default_threads() == max(1, usable_cores() - 1)


def test_saved_modules_budget_defaults_to_four_copies_of_the_base_and_takes_sizes(tiny_base, tiny_geometry):
    copy_bytes = tiny_geometry.vocab_size * tiny_geometry.hidden_size * 4  # float32 on the CPU
    assert Engine(tiny_base, EngineConfig(max_seq_len=64, max_batch_size=1)).pool.saved_budget == 4 * copy_bytes
    assert Engine(tiny_base, EngineConfig(max_seq_len=64, max_batch_size=1,
                                          saved_modules_memory="2GiB")).pool.saved_budget == 2 * 2**30


def test_host_cache_bytes_default_to_a_quarter_of_the_memory_the_process_may_use(tiny_base):
    from lorad.cpu_features import host_memory_bytes

    memory = host_memory_bytes()
    assert memory is not None and memory > 2**30  # this machine's, or its cgroup's limit
    engine = Engine(tiny_base, EngineConfig(max_seq_len=64, max_batch_size=1))
    assert engine.adapters.host_bytes == memory // 4
    assert Engine(tiny_base, EngineConfig(max_seq_len=64, max_batch_size=1,
                                          max_cpu_lora_memory="3GiB")).adapters.host_bytes == 3 * 2**30


@pytest.mark.parametrize("field, value, message", [
    ("threads", 0, "threads: must be a positive integer"),
    ("kv_cache_memory", "lots", "kv_cache_memory: 'lots' is not a size"),
    ("dequant_memory", "-1", "dequant_memory: '-1' is not a size"),
    ("dequant_memory", -5, "dequant_memory: must not be negative"),
    ("saved_modules_memory", "a lot", "saved_modules_memory: 'a lot' is not a size"),
    ("saved_modules_memory", -1, "saved_modules_memory: must not be negative"),
    ("max_cpu_lora_memory", "0", "max_cpu_lora_memory: must be a positive integer"),
])
def test_bad_sizes_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(**{field: value})


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE")


def test_cpu_kv_cache_is_resident_only_where_written(tiny_geometry):
    """A cache sized for the worst case costs RAM only for what requests write (zero pages on
    first touch); it reads as zeros everywhere else."""
    from lorad.server.kv_cache import KVCache

    before = _rss_bytes()
    kv = KVCache(tiny_geometry, rows=64, max_seq_len=8192, dtype=torch.float32, device=torch.device("cpu"))
    assert kv.nbytes == 256 * 2**20
    assert _rss_bytes() - before < 32 * 2**20  # far below the 256 MiB allocated
    assert float(kv.k[1, 63, -1, -1].abs().sum()) == 0.0 and float(kv.v[0, 5].abs().max()) == 0.0
    kv.k[0, 0, 0, :100] = 1.0
    kv.move_row(0, 3, 100)
    assert torch.equal(kv.k[0, 3, 0, :100], torch.ones(100, tiny_geometry.head_dim))
    kv.clear_row(3)
    assert float(kv.k[:, 3].abs().max()) == 0.0


def test_adapter_slots_are_resident_only_where_adapters_were_written(tiny_geometry, tmp_path):
    """Slots sized for rank 64 hold a rank-4 adapter: only its rows become resident, and an
    evicted adapter's rows are zero again (a later adapter of lower rank sees no leftovers)."""
    from lorad.adapter_format import load_adapter
    from lorad.server.lora_slots import LoRASlotPool
    from lorad.testing import write_random_adapter

    before = _rss_bytes()
    pool = LoRASlotPool(tiny_geometry, num_slots=64, max_rank=512, dtype=torch.float32, device=torch.device("cpu"))
    assert pool.nbytes > 100 * 2**20
    assert _rss_bytes() - before < 24 * 2**20
    wide = load_adapter(write_random_adapter(tmp_path / "wide", tiny_geometry, rank=8, seed=1), "wide",
                        tiny_geometry, 512)
    narrow = load_adapter(write_random_adapter(tmp_path / "narrow", tiny_geometry, rank=2, seed=2), "narrow",
                          tiny_geometry, 512)
    slot = pool.acquire_load(wide)
    m = pool.layers[0]["q_proj"]
    assert float(m.a[slot, :8].abs().sum()) > 0 and float(m.a[slot, 8:].abs().sum()) == 0
    pool.release(slot)
    assert pool.evict("wide")
    assert float(m.a[slot].abs().sum()) == 0 and float(m.b[slot].abs().sum()) == 0
    slot2 = pool.acquire_load(narrow)
    assert float(m.a[slot2, 2:].abs().sum()) == 0 and float(m.b[slot2, 2:].abs().sum()) == 0
