"""Helpers shared by the engine, isolation and fuzz tests: engines and servers on the tiny base,
a sink that records events, /metrics scraping, waiting for a condition."""

from __future__ import annotations

import threading
import time
import urllib.request

from lorad.base_model import BaseModelConfig
from lorad.server.config import EngineConfig, ServerConfig
from lorad.server.engine import Engine, Event


def make_engine(base, adapters_dir=None, **kw) -> Engine:
    cfg = dict(max_seq_len=256, kv_cache_memory="64MiB", max_lora_rank=16, max_loras=4, max_cpu_loras=8)
    cfg.update(kw)
    return Engine(base, EngineConfig(**cfg), adapters_dir=adapters_dir).start()


class Collector:
    """A sink that records every event of one request."""

    def __init__(self):
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.kind != "chunk":
            self.done.set()

    def final(self, timeout=60) -> Event:
        assert self.done.wait(timeout), "request did not finish"
        return self.events[-1]


def server_config(adapters_dir, server: dict | None = None, **engine) -> ServerConfig:
    """A loopback server on free ports (gRPC and /metrics) for the tiny base."""
    opts = dict(max_seq_len=512, kv_cache_memory="64MiB", max_lora_rank=16, max_loras=4, max_cpu_loras=8)
    opts.update(engine)
    return ServerConfig(host="127.0.0.1", port=0, metrics_port=0, adapters_dir=str(adapters_dir),
                        base=BaseModelConfig(), engine=EngineConfig(**opts), **(server or {}))


def scrape(metrics_port: int) -> dict[str, float]:
    """/metrics as {'name{labels}': value} (exactly as the exposition format spells them)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def wait_for(condition, timeout: float = 10.0, every: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(every)


def engine_gauges(metrics_port: int) -> tuple[float, float]:
    m = scrape(metrics_port)
    return m["lorad_requests_running"], m["lorad_requests_waiting"]


def wait_gauges_idle(metrics_port: int, timeout: float = 10.0) -> tuple[float, float]:
    """Wait until /metrics shows no running and no waiting request; returns the last reading."""
    last = [None]

    def idle():
        last[0] = engine_gauges(metrics_port)
        return last[0] == (0.0, 0.0)

    wait_for(idle, timeout, every=0.05)
    return last[0]
