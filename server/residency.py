"""Which adapters a server holds and serves right now: the immutable snapshot the adapter manager publishes.

The adapter tables (host copies, device slots, pins, versions) and the request queues belong to
the model thread (lorad.server.adapter_manager, lorad.server.engine); nothing else may read
them. After every change the manager builds an AdapterResidency and swaps it in with one
attribute assignment, so readers on other threads (listings, the metrics scrape, management
RPCs waiting for their answer) get a consistent picture at most one step old, without a lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping

_EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True)
class ResidentAdapter:
    """One adapter's place in memory."""

    tier: str  # "host" | "device" (adapters only on disk are absent from the snapshot)
    digest: str  # of the current resident version ("" when only retired versions are left)
    pinned: bool = False
    requests_running: int = 0  # on every version of it
    old_versions: int = 0  # retired versions still held by running requests
    host_bytes: int = 0
    stamp: tuple = ()  # files_stamp of the files the current version was read from


@dataclass(frozen=True)
class AdapterResidency:
    # per tier, by id (metrics, adapter-aware routers); an adapter in a slot is usually in host too
    device: tuple[str, ...] = ()  # adapters whose current version is in a device slot
    host: tuple[str, ...] = ()  # adapters in the host cache
    running: tuple[str, ...] = ()  # distinct adapters of running requests
    waiting: tuple[str, ...] = ()  # distinct adapters of queued requests
    max_loras: int = 0  # device slots
    published_at: float = 0.0  # time.time() of the change that published it
    # per adapter (listings)
    resident: Mapping[str, ResidentAdapter] = field(default_factory=lambda: _EMPTY)
    deleted: Mapping[str, tuple] = field(default_factory=lambda: _EMPTY)  # id -> files stamp of the deleted version
    last_used: Mapping[str, float] = field(default_factory=lambda: _EMPTY)  # unix seconds of the last admission
    errors: Mapping[str, tuple] = field(default_factory=lambda: _EMPTY)  # id -> (files stamp, message) of a failed read
    # totals (gauges)
    pinned: int = 0
    slots_used: int = 0  # slots holding any version, retired ones included
    host_bytes: int = 0
    device_bytes: int = 0


def distinct(adapter_ids: Iterable[str | None]) -> tuple[str, ...]:
    return tuple(sorted({a for a in adapter_ids if a}))
