"""Prometheus metrics for the server (names: lorad_ prefix, _seconds, _bytes, _total).

Labels are bounded: finish reasons, error kinds and cache tiers are fixed sets; adapter ids
never appear as label values (there may be thousands), except in the residency families that
`--metrics-adapter-ids` turns on (lorad.server.adapter_metrics).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lorad.server import metrics_http
from lorad.server.adapter_metrics import AdapterResidencyCollector
from lorad.server.observer import EngineObserver
from lorad.server.readiness import Readiness

# 1 ms .. ~2 min, roughly x2 per bucket
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def _process_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Metrics(EngineObserver):
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "lorad_request_duration_seconds", "Arrival to last token, per finished request.",
            ["finish_reason"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(
            "lorad_time_to_first_token_seconds", "Arrival to first generated token.", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(
            "lorad_inter_token_latency_seconds", "Time between two generated tokens of a request.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(
            "lorad_request_queue_seconds", "Arrival to admission into the running batch.", buckets=LATENCY_BUCKETS, registry=r)
        self.step_duration = Histogram(
            "lorad_step_duration_seconds", "Duration of one engine step (one batched forward).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.batch_tokens = Histogram(
            "lorad_batch_tokens", "Tokens in one engine step (prompt chunks + decode tokens).", buckets=TOKEN_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "lorad_batch_size", "Requests in one engine step.", buckets=TOKEN_BUCKETS, registry=r)
        self.waiting = Gauge("lorad_requests_waiting", "Requests queued for a batch slot.", registry=r)
        self.running = Gauge("lorad_requests_running", "Requests in the running batch.", registry=r)
        self.requests = Counter(
            "lorad_requests_total", "Finished requests by finish reason.", ["finish_reason"], registry=r)
        self.failures = Counter(
            "lorad_request_failures_total", "Requests that ended in an error, by kind.", ["kind"], registry=r)
        self.prompt_tokens = Counter("lorad_prompt_tokens_total", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("lorad_generation_tokens_total", "Generated tokens.", registry=r)
        self.adapter_hits = Counter(
            "lorad_adapter_cache_hits_total", "Adapter found in a cache tier at request admission.", ["tier"], registry=r)
        self.adapter_misses = Counter(
            "lorad_adapter_cache_misses_total", "Adapter not in a cache tier at request admission.", ["tier"], registry=r)
        self.adapter_loads = Counter(
            "lorad_adapter_loads_total", "Adapter loads by destination (host: from disk; device: into a slot).",
            ["into"], registry=r)
        self.adapter_load_time = Histogram(
            "lorad_adapter_load_seconds", "Time to load an adapter, by destination.", ["into"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.slots_used = Gauge("lorad_adapter_slots_used", "Device adapter slots holding an adapter.", registry=r)
        self.slots_total = Gauge("lorad_adapter_slots", "Device adapter slots (--max-loras).", registry=r)
        self.memory = Gauge(
            "lorad_memory_bytes", "Memory by use: base weights, kv cache, adapter slots (static, at start).",
            ["use"], registry=r)
        self.device_allocated = Gauge(
            "lorad_device_memory_allocated_bytes", "torch.cuda.memory_allocated (0 on CPU).", registry=r)
        self.device_reserved = Gauge(
            "lorad_device_memory_reserved_bytes", "torch.cuda.memory_reserved (0 on CPU).", registry=r)
        self.adapter_actions = Counter(
            "lorad_adapter_actions_total", "Adapter management actions: load, unload, delete, replace, upload, combine, merge.",
            ["action"], registry=r)
        self.transport_requests = Counter(
            "lorad_transport_requests_total",
            "Generation requests by transport (grpc, http) and outcome (ok, cancelled, error).",
            ["transport", "outcome"], registry=r)
        self.transport_duration = Histogram(
            "lorad_transport_request_seconds", "Receipt to last event of a generation request, by transport.",
            ["transport"], buckets=LATENCY_BUCKETS, registry=r)
        self.rss = Gauge("lorad_process_resident_memory_bytes", "Resident memory of the server process.", registry=r)
        self.rss.set_function(_process_rss_bytes)
        self._http = None

    def watch_device(self, device) -> None:
        """Read CUDA allocator gauges at scrape time when the engine runs on CUDA."""
        if getattr(device, "type", None) == "cuda":
            import torch

            self.device_allocated.set_function(lambda: torch.cuda.memory_allocated(device))
            self.device_reserved.set_function(lambda: torch.cuda.memory_reserved(device))

    def watch_adapters(self, snapshot, with_ids: bool) -> None:
        """Export adapter residency (tiers, pins, bytes; ids with with_ids) from the snapshot the adapter
        manager publishes (a callable returning it, None while the base loads)."""
        self.registry.register(AdapterResidencyCollector(snapshot, with_ids))

    def serve(self, host: str, port: int, readiness: Readiness | None = None) -> int:
        """Start /metrics (and /health, /ready when given readiness) over HTTP; returns the bound port."""
        self._http = metrics_http.serve(metrics_http.make_app(self.registry, readiness), host, port)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def transport_request(self, transport: str, outcome: str, seconds: float) -> None:
        """One generation request ended at a transport (lorad.server.frontend's on_done)."""
        self.transport_requests.labels(transport, outcome).inc()
        self.transport_duration.labels(transport).observe(seconds)

    # --- EngineObserver ---------------------------------------------------------------------

    def request_queued(self) -> None:
        self.waiting.inc()

    def request_admitted(self, queue_seconds: float) -> None:
        self.queue_time.observe(queue_seconds)

    def first_token(self, seconds_since_arrival: float) -> None:
        self.ttft.observe(seconds_since_arrival)
        self.generation_tokens.inc()

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.generation_tokens.inc()

    def request_finished(self, finish_reason: str, seconds: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.request_duration.labels(finish_reason).observe(seconds)
        self.requests.labels(finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)

    def request_failed(self, kind: str) -> None:
        self.failures.labels(kind).inc()

    def step(self, num_tokens: int, num_sequences: int, running: int, waiting: int, seconds: float) -> None:
        self.step_duration.observe(seconds)
        self.batch_tokens.observe(num_tokens)
        self.batch_size.observe(num_sequences)

    def requests_in_engine(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def adapter_lookup(self, tier: str, hit: bool) -> None:
        (self.adapter_hits if hit else self.adapter_misses).labels(tier).inc()

    def adapter_loaded(self, into: str, seconds: float) -> None:
        self.adapter_loads.labels(into).inc()
        self.adapter_load_time.labels(into).observe(seconds)

    def slots(self, used: int, total: int) -> None:
        self.slots_used.set(used)
        self.slots_total.set(total)

    def adapter_event(self, kind: str) -> None:
        self.adapter_actions.labels(kind).inc()
