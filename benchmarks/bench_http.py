"""What the OpenAI-compatible HTTP API costs per request next to gRPC, on the same server and
engine (embedded SmolLM2-135M, NF4, CPU): the same greedy request through lorad's gRPC client
and through the official `openai` client, interleaved, sequential (one request in flight).

    .venv/bin/python benchmarks/bench_http.py [--requests 40] [--adapter]

Modes: unary with 1 generated token (the transport's share is largest there), unary with 16
tokens, streaming with 16 tokens. Prints the median and p90 per transport, the median of the
per-pair differences (HTTP - gRPC), the CPU path and the load average. Client and server share
this process (and its GIL), as in the tests; both transports pay that alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="requests per transport and mode")
    parser.add_argument("--adapter", action="store_true", help="send every request to a rank-16 adapter")
    args = parser.parse_args()

    import torch
    from openai import OpenAI

    from lorad.base_model import BaseModelConfig, load_base
    from lorad.clients import Client
    from lorad.cpu_features import detect
    from lorad.geometry import ModelGeometry
    from lorad.server.config import EngineConfig, ServerConfig
    from lorad.testing import ServerThread, write_random_adapter

    base = load_base(BaseModelConfig())
    root = Path(tempfile.mkdtemp(prefix="lorad-bench-http-"))
    write_random_adapter(root / "bench", ModelGeometry.from_hf_config(base.model.config), rank=16, seed=0, b_std=0.01)
    adapter = "bench" if args.adapter else None
    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=None, http_port=0, adapters_dir=str(root),
                       base=BaseModelConfig(), engine=EngineConfig(max_seq_len=256, kv_cache_memory="64MiB",
                                                                   max_lora_rank=16, max_loras=2))
    prompt = "The history of the Roman Empire began"  # a continuation: it runs to max_tokens, no early EOS
    with ServerThread(cfg, base) as srv, Client(f"127.0.0.1:{srv.port}", timeout=300) as grpc_client, \
            OpenAI(base_url=f"http://127.0.0.1:{srv.server.http_port}/v1", api_key="unused", max_retries=0) as oai:
        model = adapter or srv.server.http_api.base_name

        def grpc_unary(n):
            return grpc_client.generate(prompt, adapter_id=adapter, max_new_tokens=n).completion_tokens

        def http_unary(n):
            return oai.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0).usage.completion_tokens

        def grpc_stream(n):
            return list(grpc_client.stream(prompt, adapter_id=adapter, max_new_tokens=n))[-1].completion_tokens

        def http_stream(n):
            chunks = oai.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
            return list(chunks)[-1].usage.completion_tokens

        modes = [("unary, 1 token", grpc_unary, http_unary, 1), ("unary, 16 tokens", grpc_unary, http_unary, 16),
                 ("stream, 16 tokens", grpc_stream, http_stream, 16)]
        for _, g, h, n in modes:  # warm both paths (tokenizer, adapter load, connections)
            for _ in range(3):
                g(n), h(n)
        load_before = os.getloadavg()
        results = []
        for name, g, h, n in modes:
            times = {"grpc": [], "http": []}
            tokens = {"grpc": 0, "http": 0}
            for i in range(args.requests):
                order = [("grpc", g), ("http", h)] if i % 2 == 0 else [("http", h), ("grpc", g)]
                for transport, call in order:
                    start = time.perf_counter()
                    tokens[transport] += call(n)
                    times[transport].append(time.perf_counter() - start)
            assert tokens["grpc"] == tokens["http"], f"{name}: the transports generated different token counts {tokens}"
            results.append((f"{name} ({tokens['grpc'] / args.requests:g} out)", times))
        load_after = os.getloadavg()

    cpu = detect()
    print(f"lorad HTTP vs gRPC, embedded SmolLM2-135M NF4 on CPU ({cpu.path} path; {cpu.describe()}), "
          f"torch threads {torch.get_num_threads()}, {'adapter rank 16' if adapter else 'base, no adapter'}, "
          f"{args.requests} requests per transport and mode, sequential")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    print(f"{'mode':<30} {'gRPC median':>12} {'HTTP median':>12} {'gRPC p90':>10} {'HTTP p90':>10} "
          f"{'HTTP-gRPC (median of pairs)':>28}")
    for name, times in results:
        g, h = times["grpc"], times["http"]
        diff = statistics.median(b - a for a, b in zip(g, h))

        def p90(xs):
            return sorted(xs)[int(0.9 * (len(xs) - 1))]

        print(f"{name:<30} {statistics.median(g) * 1e3:>10.1f}ms {statistics.median(h) * 1e3:>10.1f}ms "
              f"{p90(g) * 1e3:>8.1f}ms {p90(h) * 1e3:>8.1f}ms {diff * 1e3:>+26.2f}ms")


if __name__ == "__main__":
    main()
