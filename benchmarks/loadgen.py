"""Load generator for a lorad server or cluster: closed-loop streams over a skewed (Zipf) adapter mix.

    .venv/bin/python benchmarks/loadgen.py --target 127.0.0.1:50050 --adapters tenant-00,tenant-01,... \
        --concurrency 12 --duration 60 --zipf 1.1

Each of `concurrency` workers sends one GenerateStream at a time (the next as soon as the last
ends), naming adapter k of the list with probability proportional to 1 / (k + 1) ** zipf, with
the x-lorad-adapter routing key (lorad.clients). It records time to first token, latency and
tokens per request. UNAVAILABLE is retried by the client's gRPC retry policy while no token has
arrived. A stream cut after tokens arrived (its replica died under it) cannot be resumed: HAProxy
ends it without gRPC trailers, which grpc reports as UNKNOWN "Stream removed". Generation has no
side effects, so this client, like an application would, re-sends it from the start (up to 3
times; counted as `restarted`). A request counts as `failed` only when it never completes.
Used by benchmarks/bench_cluster.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field

import grpc

from lorad.clients import AsyncClient, Completion, LoradRPCError

PROMPTS = [
    "Write a short note to a customer about a delayed order.",
    "Summarise the plot of a detective story in two sentences.",
    "Explain what a load balancer does.",
    "Give three tips for writing clear documentation.",
    "Describe a sunrise over the sea.",
    "What should I pack for a weekend hike?",
]
MAX_RESTARTS = 3


def cut_by_transport(err: LoradRPCError) -> bool:
    """The request did not fail: its server or connection went away (safe to re-send a generation)."""
    return err.code == grpc.StatusCode.UNAVAILABLE or (
        err.code == grpc.StatusCode.UNKNOWN and err.details.startswith("Stream removed"))


@dataclass
class RequestRecord:
    adapter: str
    started: float  # seconds since the run began
    ok: bool = False
    ttft: float | None = None
    latency: float | None = None
    tokens: int = 0
    restarted: int = 0
    error: str = ""


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (k + 1) ** s for k in range(n)]


@dataclass
class LoadResult:
    records: list[RequestRecord] = field(default_factory=list)
    duration: float = 0.0

    def window(self, start: float, end: float) -> "LoadResult":
        """Requests that started in [start, end) seconds of the run."""
        return LoadResult([r for r in self.records if start <= r.started < end], end - start)

    def summary(self) -> dict:
        done = [r for r in self.records if r.ok]
        ttfts = sorted(r.ttft for r in done if r.ttft is not None)
        latencies = sorted(r.latency for r in done)
        tokens = sum(r.tokens for r in done)
        return {
            "requests": len(self.records),
            "ok": len(done),
            "failed": len(self.records) - len(done),
            "restarted": sum(r.restarted for r in self.records),
            "tokens": tokens,
            "tok_per_s": tokens / self.duration if self.duration else 0.0,
            "req_per_s": len(done) / self.duration if self.duration else 0.0,
            "ttft_p50": percentile(ttfts, 50),
            "ttft_p99": percentile(ttfts, 99),
            "latency_p50": percentile(latencies, 50),
            "latency_p99": percentile(latencies, 99),
            "errors": sorted({r.error for r in self.records if r.error})[:5],
        }


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


async def _one(client: AsyncClient, record: RequestRecord, prompt: str, max_new_tokens: int, t0: float) -> None:
    for attempt in range(MAX_RESTARTS + 1):
        sent = time.perf_counter()
        first = None
        try:
            async for piece in client.stream(prompt, adapter_id=record.adapter, max_new_tokens=max_new_tokens):
                if first is None:
                    first = time.perf_counter()
                if isinstance(piece, Completion):
                    record.ok = True
                    record.tokens = piece.completion_tokens
                    record.ttft = first - sent
                    record.latency = time.perf_counter() - sent
                    record.error = ""
                    return
        except LoradRPCError as err:
            record.error = f"{err.code.name}: {err.details[:120]}"
            if not cut_by_transport(err) or attempt == MAX_RESTARTS:
                return
            record.restarted += 1


async def run_load(target: str, adapters: list[str], *, concurrency: int = 12, duration: float = 60.0,
                   zipf: float = 1.1, max_new_tokens: int = 16, seed: int = 0, timeout: float = 120.0,
                   on_start=None) -> LoadResult:
    """Drive `target` for `duration` seconds; on_start(t0) is called once when the clock starts."""
    weights = zipf_weights(len(adapters), zipf)
    result = LoadResult()
    async with AsyncClient(target, timeout=timeout) as client:
        t0 = time.perf_counter()
        if on_start is not None:
            on_start(t0)

        async def worker(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            while (now := time.perf_counter() - t0) < duration:
                record = RequestRecord(adapter=rng.choices(adapters, weights)[0], started=now)
                result.records.append(record)
                await _one(client, record, rng.choice(PROMPTS), max_new_tokens, t0)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        result.duration = time.perf_counter() - t0
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="127.0.0.1:50050")
    ap.add_argument("--adapters", required=True, help="comma-separated adapter ids, most popular first")
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--zipf", type=float, default=1.1, help="popularity skew s: P(k) ~ 1 / (k + 1) ** s")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_out", help="write every request record here")
    args = ap.parse_args()
    adapters = [a for a in args.adapters.split(",") if a]
    result = asyncio.run(run_load(args.target, adapters, concurrency=args.concurrency, duration=args.duration,
                                  zipf=args.zipf, max_new_tokens=args.max_new_tokens, seed=args.seed))
    print(json.dumps(result.summary(), indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"summary": result.summary(), "records": [asdict(r) for r in result.records]}, f)


if __name__ == "__main__":
    main()
