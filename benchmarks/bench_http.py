"""What the OpenAI-compatible HTTP API costs per request next to gRPC, on the same server and
engine (embedded SmolLM2-135M, NF4, CPU): the same greedy request through lorad's gRPC client
and through the official `openai` client, interleaved, sequential (one request in flight).

    .venv/bin/python benchmarks/bench_http.py [--requests 40] [--adapter]
    .venv/bin/python benchmarks/bench_http.py --per-token [--tokens 400]

Modes: unary with 1 generated token (the transport's share is largest there), unary with 16
tokens, streaming with 16 tokens. Three clients: lorad's gRPC client, the `openai` SDK, and a
bare httpx client posting the same JSON (what the server side of HTTP costs, without the SDK's
own parsing). Prints medians and p90s, the median of the per-round differences against gRPC,
the CPU path and the load average. The server is `lorad serve` in its own process, as users run
it (a client in the server's process would compete with it for the GIL).

--per-token: what each streamed token costs a transport, on a server whose steps are cheap (the
tiny random Llama of the tests, in this process): long greedy requests, unary and streamed,
through gRPC and through bare httpx, as milliseconds per generated token.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="requests per transport and mode")
    parser.add_argument("--adapter", action="store_true", help="send every request to a rank-16 adapter")
    parser.add_argument("--per-token", action="store_true", help="the per-token cost on the tiny model instead")
    parser.add_argument("--tokens", type=int, default=400, help="tokens per request with --per-token")
    args = parser.parse_args()
    if args.per_token:
        return per_token(args.tokens, args.requests)

    import httpx
    from openai import OpenAI

    from transformers import AutoConfig

    from lorad.base_model import embedded_model_dir
    from lorad.clients import Client
    from lorad.cpu_features import detect
    from lorad.geometry import ModelGeometry
    from lorad.testing import ServeProcess, write_random_adapter

    tmp = Path(tempfile.mkdtemp(prefix="lorad-bench-http-"))
    atexit.register(shutil.rmtree, tmp / "adapters", True)  # the server log stays, for reading
    geometry = ModelGeometry.from_hf_config(AutoConfig.from_pretrained(embedded_model_dir()))
    write_random_adapter(tmp / "adapters" / "bench", geometry, rank=16, seed=0, b_std=0.01)
    adapter = "bench" if args.adapter else None
    prompt = "The history of the Roman Empire began"  # a continuation: it runs to max_tokens, no early EOS
    serve = ServeProcess(["--adapters", str(tmp / "adapters"), "--http-port", "0", "--max-seq-len", "256",
                          "--kv-cache-memory", "64MiB", "--max-lora-rank", "16", "--max-loras", "2"], tmp / "serve.log")
    with serve as srv, Client(srv.target, timeout=300) as grpc_client, \
            OpenAI(base_url=srv.http_url, api_key="unused", max_retries=0) as oai, \
            httpx.Client(base_url=srv.http_url, timeout=300) as bare:
        model = adapter or oai.models.list().data[0].id

        def grpc_unary(n):
            return grpc_client.generate(prompt, adapter_id=adapter, max_new_tokens=n).completion_tokens

        def http_unary(n):
            return oai.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0).usage.completion_tokens

        def bare_unary(n):
            body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0}
            return bare.post("/completions", json=body).json()["usage"]["completion_tokens"]

        def bare_stream(n):
            body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            with bare.stream("POST", "/completions", json=body) as response:
                events = [line for line in response.iter_lines() if line.startswith("data: {")]
            return json.loads(events[-1][6:])["usage"]["completion_tokens"]

        def grpc_stream(n):
            return list(grpc_client.stream(prompt, adapter_id=adapter, max_new_tokens=n))[-1].completion_tokens

        def http_stream(n):
            chunks = oai.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
            return list(chunks)[-1].usage.completion_tokens

        modes = [("unary, 1 token", {"grpc": grpc_unary, "openai": http_unary, "httpx": bare_unary}, 1),
                 ("unary, 16 tokens", {"grpc": grpc_unary, "openai": http_unary, "httpx": bare_unary}, 16),
                 ("stream, 16 tokens", {"grpc": grpc_stream, "openai": http_stream, "httpx": bare_stream}, 16)]
        for _, calls, n in modes:  # warm every path (tokenizer, adapter load, connections)
            for _ in range(3):
                for call in calls.values():
                    call(n)
        load_before = os.getloadavg()
        results = []
        for name, calls, n in modes:
            times = {client: [] for client in calls}
            tokens = {client: 0 for client in calls}
            for i in range(args.requests):
                order = list(calls.items())
                order = order[i % 3:] + order[:i % 3]  # rotate who goes first
                for client, call in order:
                    start = time.perf_counter()
                    tokens[client] += call(n)
                    times[client].append(time.perf_counter() - start)
            assert len(set(tokens.values())) == 1, f"{name}: the clients generated different token counts {tokens}"
            results.append((f"{name} ({tokens['grpc'] / args.requests:g} out)", times))
        load_after = os.getloadavg()

    cpu = detect()
    print(f"lorad HTTP vs gRPC, embedded SmolLM2-135M NF4 on CPU ({cpu.path} path; {cpu.describe()}), "
          f"server log {tmp / 'serve.log'}, {'adapter rank 16' if adapter else 'base, no adapter'}, "
          f"{args.requests} requests per transport and mode, sequential")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    print(f"{'mode':<28} {'gRPC':>9} {'openai':>9} {'httpx':>9}   {'p90 gRPC/openai/httpx':>24}   "
          f"{'openai-gRPC':>11} {'httpx-gRPC':>10}  (medians; differences: median of rounds)")

    def p90(xs):
        return sorted(xs)[int(0.9 * (len(xs) - 1))]

    for name, t in results:
        med = {c: statistics.median(v) * 1e3 for c, v in t.items()}
        diff = {c: statistics.median(b - a for a, b in zip(t["grpc"], t[c])) * 1e3 for c in ("openai", "httpx")}
        p90s = "/".join(f"{p90(t[c]) * 1e3:.0f}" for c in ("grpc", "openai", "httpx"))
        print(f"{name:<28} {med['grpc']:>7.1f}ms {med['openai']:>7.1f}ms {med['httpx']:>7.1f}ms   {p90s:>21} ms   "
              f"{diff['openai']:>+9.1f}ms {diff['httpx']:>+8.1f}ms")


def per_token(tokens: int, requests: int) -> None:
    import httpx
    import torch
    from transformers import AutoTokenizer

    from lorad.base_model import BaseModelConfig, LoadedBase, ResolvedBase, embedded_model_dir
    from lorad.clients import Client
    from lorad.cpu_features import detect
    from lorad.server.config import EngineConfig, ServerConfig
    from lorad.testing import ServerThread, tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    model = tiny_llama(len(tokenizer), max_position_embeddings=tokens + 64)
    base = LoadedBase(model=model, tokenizer=tokenizer, resolved=ResolvedBase("tiny", "local", "<memory>", "none"),
                      device=torch.device("cpu"), compute_dtype=torch.float32)
    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=None, http_port=0, base=BaseModelConfig(),
                       engine=EngineConfig(max_seq_len=tokens + 64, kv_cache_memory="64MiB",
                                           default_max_new_tokens=tokens, max_new_tokens_limit=tokens))
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": tokens, "temperature": 0}
    with ServerThread(cfg, base) as srv, Client(f"127.0.0.1:{srv.port}", timeout=300) as g, \
            httpx.Client(base_url=f"http://127.0.0.1:{srv.server.http_port}/v1", timeout=300) as h:
        def http_stream():
            with h.stream("POST", "/completions", json={**body, "stream": True}) as response:
                return sum(1 for _ in response.iter_lines())

        calls = {"gRPC unary": lambda: g.generate("Hello", max_new_tokens=tokens),
                 "HTTP unary": lambda: h.post("/completions", json=body).json(),
                 "gRPC stream": lambda: list(g.stream("Hello", max_new_tokens=tokens)),
                 "HTTP stream": http_stream}
        for call in calls.values():
            call()
        times = {name: [] for name in calls}
        load = os.getloadavg()[0]
        for _ in range(requests):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    print(f"per generated token, tiny random Llama in this process, {tokens} tokens per request, {requests} "
          f"requests each; {detect().path} path; load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
    for name, t in times.items():
        print(f"  {name:<12} {statistics.median(t) / tokens * 1e3:6.2f} ms/token")


if __name__ == "__main__":
    main()
