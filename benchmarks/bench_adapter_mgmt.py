"""Adapter management latencies and memory on a real server (embedded SmolLM2-135M, NF4, CPU):
upload, load (disk -> host -> device), unload (and the host memory it gives back), replace,
and a server-side combine of two adapters (CombineAdapters, svd back to --rank, published).

    .venv/bin/python benchmarks/bench_adapter_mgmt.py [--rank 16] [--repeats 5]

The server runs in this process (lorad.testing.ServerThread) so its RSS is this process's; the
adapter is random, rank --rank on all seven projections of all 30 layers (fp32, as PEFT saves
it). Prints medians over --repeats rounds, the CPU path and the load average.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import gc

    import torch

    from lorad.base_model import BaseModelConfig, load_base
    from lorad.clients import Client
    from lorad.geometry import ModelGeometry
    from lorad.server.config import EngineConfig, ServerConfig
    from lorad.testing import ServerThread, write_random_adapter

    base = load_base(BaseModelConfig())
    geometry = ModelGeometry.from_hf_config(base.model.config)
    tmp = Path(tempfile.mkdtemp(prefix="lorad-bench-mgmt-"))
    atexit.register(shutil.rmtree, tmp, True)
    root = tmp / "adapters"
    root.mkdir()
    versions = [write_random_adapter(tmp / f"v{i}", geometry, rank=args.rank, seed=i, b_std=0.01) for i in range(2)]
    size = (versions[0] / "adapter_model.safetensors").stat().st_size
    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=None, adapters_dir=str(root),
                       base=BaseModelConfig(), engine=EngineConfig(max_seq_len=256, kv_cache_memory="64MiB",
                                                                   max_lora_rank=args.rank, max_loras=4))
    rows: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)

    with ServerThread(cfg, base) as srv, Client(f"127.0.0.1:{srv.port}", timeout=300) as c:
        c.generate("warm up", max_new_tokens=2)
        for i, version in enumerate(versions):  # the inputs of the combine rounds
            c.upload_adapter(version, f"input-{i}")
        for i in range(args.repeats):
            adapter_id = f"bench-{i}"
            started = time.perf_counter()
            c.upload_adapter(versions[0], adapter_id)
            note("upload (validate + fsync + publish), ms", (time.perf_counter() - started) * 1e3)
            gc.collect()
            before = rss()
            started = time.perf_counter()
            loaded = c.load_adapter(adapter_id)
            note("load RPC, cold, ms", (time.perf_counter() - started) * 1e3)
            note("  disk -> host (read + validate + digest), ms", loaded.host_load_seconds * 1e3)
            note("  host -> device slot, ms", loaded.device_load_seconds * 1e3)
            note("RSS after load - before, MB", (rss() - before) / 1e6)
            c.generate("Hello", adapter_id=adapter_id, max_new_tokens=4)
            started = time.perf_counter()
            unloaded = c.unload_adapter(adapter_id)
            note("unload RPC (idle adapter), ms", (time.perf_counter() - started) * 1e3)
            gc.collect()
            note("RSS after unload - before load, MB", (rss() - before) / 1e6)
            note("host bytes freed, MB", unloaded.freed_host_bytes / 1e6)
            # replace while one request streams on the old version
            c.load_adapter(adapter_id)
            stream = c.stream("Tell me a story", adapter_id=adapter_id, max_new_tokens=64)
            next(stream)
            started = time.perf_counter()
            c.upload_adapter(versions[1], adapter_id, replace=True)
            note("replace RPC under traffic (upload + publish + retire), ms", (time.perf_counter() - started) * 1e3)
            started = time.perf_counter()
            first = c.generate("Hello", adapter_id=adapter_id, max_new_tokens=1)
            note("first request on the new version (cold load + 1 token), ms", (time.perf_counter() - started) * 1e3)
            old = list(stream)[-1]
            assert first.adapter_version != old.adapter_version
            c.delete_adapter(adapter_id)
            started = time.perf_counter()
            combined = c.combine_adapters([("input-0", 1.0), ("input-1", 0.5)], f"combined-{i}", method="svd",
                                          rank=args.rank)
            note(f"combine 2 adapters (svd to rank {args.rank}) + publish, ms", (time.perf_counter() - started) * 1e3)
            note("  combine relative error (x1e6)", combined.overall_error * 1e6)
            c.delete_adapter(f"combined-{i}")

    print(f"adapter: rank {args.rank}, all projections, {size / 1e6:.1f} MB fp32; torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"avx512_bf16 {'yes' if 'avx512_bf16' in open('/proc/cpuinfo').read() else 'no'}; "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, values in rows.items():
        print(f"{name:62} median {statistics.median(values):9.1f}   (min {min(values):.1f}, max {max(values):.1f})")


if __name__ == "__main__":
    main()
