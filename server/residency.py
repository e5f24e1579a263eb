"""Which adapters a server holds and serves right now: an immutable snapshot the model thread publishes.

The slot table (lora_slots) and the request queues belong to the model thread; nothing else may
read them. At the end of every loop iteration the engine builds an AdapterResidency and swaps
it in with one attribute assignment, so readers on other threads (the metrics scrape, later the
adapter manager's listing) get a consistent picture at most one step old, without a lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class AdapterResidency:
    device: tuple[str, ...] = ()  # adapters in a device slot
    host: tuple[str, ...] = ()  # adapters in the host cache (an adapter in a slot is usually here too)
    running: tuple[str, ...] = ()  # distinct adapters of running requests
    waiting: tuple[str, ...] = ()  # distinct adapters of queued requests
    max_loras: int = 0  # device slots
    published_at: float = 0.0  # time.time() of the step that published it


def _distinct(adapter_ids: Iterable[str | None]) -> tuple[str, ...]:
    return tuple(sorted({a for a in adapter_ids if a}))


def residency_snapshot(slot_adapters: Iterable[str | None], host_ids: Iterable[str],
                       running_ids: Iterable[str | None], waiting_ids: Iterable[str | None],
                       max_loras: int) -> AdapterResidency:
    return AdapterResidency(
        device=_distinct(slot_adapters),
        host=_distinct(host_ids),
        running=_distinct(running_ids),
        waiting=_distinct(waiting_ids),
        max_loras=max_loras,
        published_at=time.time(),
    )
