"""Hooks the engine calls as work happens; metrics (lorad.server.metrics) implement them.

The engine only knows this interface, so it runs and tests without Prometheus.
"""

from __future__ import annotations


class EngineObserver:
    def request_queued(self) -> None: ...

    def request_admitted(self, queue_seconds: float) -> None: ...

    def first_token(self, seconds_since_arrival: float) -> None: ...

    def inter_token(self, seconds: float) -> None: ...

    def request_finished(self, finish_reason: str, seconds: float, prompt_tokens: int, completion_tokens: int) -> None: ...

    def request_failed(self, kind: str) -> None: ...

    def step(self, num_tokens: int, num_sequences: int, running: int, waiting: int, seconds: float) -> None: ...

    def requests_in_engine(self, running: int, waiting: int) -> None:
        """Requests in the running batch and in the queue, after every loop iteration (idle too)."""

    def adapter_lookup(self, tier: str, hit: bool) -> None:
        """tier: 'device' (a slot already held it) or 'host' (the host cache held it)."""

    def adapter_loaded(self, into: str, seconds: float) -> None:
        """into: 'host' (read from disk) or 'device' (copied into a slot)."""

    def slots(self, used: int, total: int) -> None: ...

    def adapter_event(self, kind: str) -> None:
        """kind: load | unload | delete | replace | upload (management actions, counted)."""
