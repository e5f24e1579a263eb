"""The one thread that runs torch compute for a server: it loads the base, builds the engine and
runs the engine loop.

Why one thread: PyTorch on Linux runs intra-op parallelism on libgomp (OpenMP), and libgomp
gives every thread that starts parallel regions its own pool of worker threads. Once a process
holds more OpenMP threads than cores (say, the base loaded on one thread and the engine stepping
on another, each with a pool), libgomp stops spinning between parallel regions and every
parallel op pays a sleep/wake cycle. Measured on 2 cores with SmolLM2: decode steps of 172 ms
instead of 84 ms. Keeping every parallel torch op of the serving path on this thread avoids it;
the adapter loader thread touches tensors only through numpy for the same reason
(lorad.adapter_format).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class ModelThread:
    def __init__(self, name: str = "lorad-model"):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def submit(self, fn: Callable[..., T], *args, **kwargs) -> Future:
        return self._executor.submit(fn, *args, **kwargs)

    def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run fn on the model thread and wait for its result (or exception)."""
        return self.submit(fn, *args, **kwargs).result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False)
