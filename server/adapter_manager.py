"""The one owner of adapter state: host copies, device slots, pins, versions, load errors.

    disk     (lorad.server.adapter_store: the folder, header checks; read by any thread)
      -> host    validated tensors of an adapter's current version, LRU (--max-cpu-loras)
        -> device  slots (lorad.server.lora_slots, --max-loras); pinned adapters keep theirs

Only the model thread writes these tables. The engine calls acquire / release while it admits
and retires requests, and hands every other message to `handle` between two steps: management
commands from RPC handlers (load, pin, unpin, unload, delete, published) and results of the
loader thread (LoadDone). No other thread touches a table; they read `snapshot`, the immutable
AdapterResidency (lorad.server.residency) the model thread publishes after every change, and
wait on a command's future. The same snapshot feeds listings and the residency metrics.

Versions. A version is the content digest of an adapter's files (lorad.server.adapter_publish).
A request is bound to the version in its slot when it is admitted and keeps it to the end.
A replace, an unload, a delete or files changed on disk *retire* the current version: its slot
stops being handed out but keeps its weights for the requests running on it, and is freed when
the last of them ends (lorad.server.lora_slots.retire); its host copy is dropped at once. The
next request loads the adapter afresh, so two versions of one adapter can be resident at once.

Pins hold one reference on their slot, so LRU never evicts it; at most max_loras - 1 adapters
are pinned, so base and unpinned traffic always have a slot.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterable

from lorad.adapter_format import LoadedAdapter
from lorad.errors import AdapterNotFoundError, EngineStoppedError, InvalidAdapterError, LimitExceededError, LoradError

from lorad.server.adapter_publish import files_stamp
from lorad.server.adapter_store import ChangedWhileRead
from lorad.server.lora_slots import LoRASlotPool
from lorad.server.observer import EngineObserver
from lorad.server.residency import AdapterResidency, ResidentAdapter, distinct

log = logging.getLogger(__name__)

MAX_REREADS = 3  # reads in a row an adapter's files may change under before its requests fail


# --- what listings show ----------------------------------------------------------------------------


@dataclass
class AdapterStatus:
    """One adapter as a listing shows it (disk facts and residency)."""

    adapter_id: str
    location: str  # "disk" | "host" | "device"
    rank: int = 0
    lora_alpha: float = 0.0
    target_modules: tuple[str, ...] = ()
    saved_modules: tuple[str, ...] = ()  # modules_to_save it replaces (lm_head, embed_tokens)
    size_bytes: int = 0
    error: str = ""
    digest: str = ""  # of the resident version ("" when only on disk)
    pinned: bool = False
    requests_running: int = 0
    old_versions: int = 0
    last_used: float = 0.0  # unix seconds, 0 = not since start


# --- messages to the model thread -----------------------------------------------------------------


@dataclass(eq=False)
class Command:
    adapter_id: str
    done: Future = field(default_factory=Future, repr=False)
    started: float = field(default_factory=time.perf_counter, repr=False)


@dataclass
class LoadReport:
    """What a Load command answers with: the version, and the time spent in each tier."""

    digest: str = ""
    host_seconds: float = 0.0
    device_seconds: float = 0.0


@dataclass(eq=False)
class Load(Command):
    pin: bool = False
    report: LoadReport = field(default_factory=LoadReport, repr=False)


class Unpin(Command):
    pass


class Unload(Command):
    pass


class Delete(Command):
    pass


class Undelete(Command):
    """A DeleteAdapter that did not remove the folder (its caller went away mid-drain, the
    rename failed): the files stay, so the id serves again."""


@dataclass(eq=False)
class Published(Command):
    """New files were published under adapter_id (an upload, a replace): retire what is resident."""

    digest: str = ""


@dataclass(eq=False)
class LoadDone:
    adapter_id: str
    generation: int
    future: Future  # of AdapterStore.read: a LoadedAdapter, or the load error


@dataclass
class DrainReport:
    """What an Unload / Delete answers with once the adapter's memory is free."""

    digest: str = ""
    requests_drained: int = 0
    seconds: float = 0.0
    freed_host_bytes: int = 0
    freed_slot: bool = False


@dataclass
class _Drain:
    command: Command
    report: DrainReport
    slots: set[int]


def _still_deleted(deleted, adapter_id: str, path) -> bool:
    """Whether the files at path are the version that was deleted (deleted: id -> its stamp)."""
    stamp = deleted.get(adapter_id)
    return stamp is not None and files_stamp(path) == stamp


def _log_lost_pin(done: Future) -> None:
    """The pin a re-published version should inherit; nobody waits on it, so its failure is logged."""
    if not done.cancelled() and done.exception() is not None:
        log.warning("a re-published pinned adapter could not be pinned again: %s", done.exception())


# --- the owner --------------------------------------------------------------------------------------


class AdapterManager:
    def __init__(self, store, pool: LoRASlotPool, host_capacity: int, observer: EngineObserver | None = None,
                 post: Callable[[object], None] | None = None,
                 fail_waiting: Callable[[str, LoradError], None] | None = None, host_bytes: int | None = None):
        """store: the disk side (path_for, geometry, max_rank, root); pool: the device slots;
        host_capacity / host_bytes: the most adapters / bytes the host cache holds (None: no byte bound);
        post(message): put a message into the engine's inbox (the loader thread uses it);
        fail_waiting(id, error): fail the queued requests of an adapter (load error, delete)."""
        self.store = store
        self.pool = pool
        self.host_capacity = host_capacity
        self.host_bytes = host_bytes
        self.max_pins = pool.num_slots - 1
        self.observer = observer or EngineObserver()
        self.post = post or (lambda message: None)
        self.fail_waiting = fail_waiting or (lambda adapter_id, error: None)
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorad-adapter-loader")
        # model-thread tables
        self._host: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._loading: dict[str, int] = {}  # adapter id -> generation of the read in flight
        self._rereads: dict[str, int] = {}  # adapter id -> reads in a row that met a replace mid-way
        self._generation = itertools.count(1)
        self._current_gen: dict[str, int] = {}  # a read started before a retire is stale when it lands
        self._failed: dict[str, tuple[tuple, InvalidAdapterError]] = {}  # id -> (files stamp, error)
        self._slot_digest: dict[int, str] = {}  # slot -> digest of the version it holds
        self._version_stamp: dict[str, tuple] = {}  # id -> files stamp of its resident version
        self._retired: dict[int, str] = {}  # slot -> adapter id, for slots of retired versions still in use
        self._pinned: set[str] = set()
        self.waits_for_saved = False  # the last acquire's None waits for modules_to_save room, not a slot
        # id -> files stamp of the version deleted: the mark holds while those very files are
        # there; files published again (another replica on a shared folder, a copy by hand) have
        # another stamp (inode, ctime) and serve
        self._deleted: dict[str, tuple] = {}
        self._last_used: dict[str, float] = {}
        self._pending_loads: list[Load] = []
        self._drains: list[_Drain] = []
        self._dirty = True
        self._waiting: tuple[str, ...] = ()  # distinct adapters of queued requests (the engine tells)
        self.snapshot = AdapterResidency(max_loras=pool.num_slots)
        self.publish()

    # --- any thread -----------------------------------------------------------------------------

    def check_servable(self, adapter_id: str) -> None:
        """Refuse at submit an id that is invalid, deleted or not on disk."""
        path = self.store.path_for(adapter_id)  # INVALID_ARGUMENT / NOT_FOUND
        if _still_deleted(self.snapshot.deleted, adapter_id, path):
            raise AdapterNotFoundError(f"adapter {adapter_id!r} not found (it was deleted)")

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    def fail_pending(self, error: LoradError) -> None:
        """Model thread, at shutdown: answer the commands still waiting (a load for a slot, an
        unload for its running requests) with error."""
        for command in [*self._pending_loads, *(d.command for d in self._drains)]:
            if not command.done.done():
                command.done.set_exception(error)
        self._pending_loads, self._drains = [], []

    def list_adapters(self) -> list[AdapterStatus]:
        """Every adapter folder with its residency (any thread: disk facts plus the snapshot); a
        broken adapter is listed with its error, it never fails the listing."""
        snapshot = self.snapshot
        out = []
        for adapter_id in self.store.list_ids():
            try:
                out.append(self._status(adapter_id, snapshot))
            except Exception:  # a bug here must cost one entry, not everyone's listing
                log.exception("listing adapter %s failed", adapter_id)
                out.append(AdapterStatus(adapter_id, "disk", error=f"adapter {adapter_id!r} could not be listed; "
                                                                   "see the server log"))
        return out

    def _status(self, adapter_id: str, snapshot: AdapterResidency) -> AdapterStatus:
        status = AdapterStatus(adapter_id, "disk", last_used=snapshot.last_used.get(adapter_id, 0.0))
        try:
            stamp = files_stamp(self.store.path_for(adapter_id))
        except LoradError as exc:
            status.error = str(exc)
            return status
        here = snapshot.resident.get(adapter_id)
        if here is not None:
            status.requests_running, status.old_versions = here.requests_running, here.old_versions
            if here.digest and here.stamp == stamp:  # a copy of files changed since will not serve again
                status.location, status.digest, status.pinned = here.tier, here.digest, here.pinned
        failed = snapshot.errors.get(adapter_id)
        if failed is not None and failed[0] == stamp:
            status.error = failed[1]
            return status
        try:
            spec = self.store.inspect(adapter_id)
        except (InvalidAdapterError, AdapterNotFoundError) as exc:
            status.error = str(exc)
            return status
        status.rank, status.lora_alpha = spec.rank, spec.lora_alpha
        status.target_modules, status.size_bytes = spec.target_modules, spec.size_bytes
        status.saved_modules = spec.saved_modules
        return status

    # --- model thread: requests -----------------------------------------------------------------

    def acquire(self, adapter_id: str, first_try: bool) -> tuple[int, str] | None:
        """(slot, version digest) for a request being admitted, taking a slot reference; None
        while the adapter is loading, every slot is busy, or (waits_for_saved) its modules_to_save
        copies wait for room that running requests hold. Raises the adapter's load error."""
        self.waits_for_saved = False
        self._check_not_deleted(adapter_id)
        self._retire_if_changed(adapter_id)
        slot = self.pool.acquire_resident(adapter_id)
        if first_try:
            self.observer.adapter_lookup("device", slot is not None)
        if slot is None:
            adapter = self._host_copy(adapter_id)
            if first_try:
                self.observer.adapter_lookup("host", adapter is not None)
            if adapter is None:
                self._start_load(adapter_id)
                return None
            slot = self._put_on_device(adapter)
            if slot is None:
                self.waits_for_saved = self.pool.waits_for_saved
                return None
        self._last_used[adapter_id] = time.time()
        self._dirty = True
        return slot, self._slot_digest[slot]

    def release(self, slot: int) -> None:
        self.pool.release(slot)
        self._dirty = True
        if self.pool.refcount[slot] == 0 and slot in self._retired:
            del self._retired[slot]
            self._slot_digest.pop(slot, None)
            self._finish_drains()

    def brings_saved_copies(self, adapter_id: str) -> bool:
        """Whether the adapter, as resident or read, holds modules_to_save copies (unknown: False)."""
        slot = self.pool.lookup(adapter_id)
        if slot is not None:
            return self.pool.slot_saved_nbytes(slot) > 0
        adapter = self._host.get(adapter_id)
        return adapter is not None and bool(adapter.saved_modules)

    def is_loading(self, adapter_id: str) -> bool:
        return adapter_id in self._loading

    def host_ready(self, adapter_id: str) -> bool:
        return adapter_id in self._host

    # --- model thread: messages -----------------------------------------------------------------

    def handle(self, message) -> None:
        """One message from the inbox; a command's error goes to its future, never up."""
        self._dirty = True
        if isinstance(message, LoadDone):
            self._load_done(message)
            return
        try:
            getattr(self, f"_on_{type(message).__name__.lower()}")(message)
        except Exception as exc:  # noqa: BLE001 - the caller (an RPC handler) reports it
            if not message.done.done():
                message.done.set_exception(exc)

    def _answer(self, command: Command, result) -> None:
        """Resolve a command after publishing a snapshot, so its caller reads its effect."""
        self._dirty = True
        self.publish()
        if not command.done.done():
            command.done.set_result(result)

    def progress(self) -> None:
        """Retry what waits on the model thread: Load commands waiting for a free slot."""
        if self._pending_loads:
            waiting, self._pending_loads = self._pending_loads, []
            for command in waiting:
                self.handle(command)

    def publish(self, waiting: Iterable[str | None] | None = None) -> None:
        """Publish a new snapshot if anything changed since the last one. waiting: the adapter
        ids of the engine's queued requests (None: unchanged)."""
        if waiting is not None:
            waiting = distinct(waiting)
            if waiting != self._waiting:
                self._waiting, self._dirty = waiting, True
        if not self._dirty:
            return
        self._dirty = False
        pool, pins = self.pool, self._pinned
        resident: dict[str, ResidentAdapter] = {}
        running: dict[str, int] = {}
        old: dict[str, int] = {}
        for slot, owner in self._retired.items():
            running[owner] = running.get(owner, 0) + pool.refcount[slot]
            old[owner] = old.get(owner, 0) + 1
        for adapter_id, slot in pool.slot_of.items():
            refs = pool.refcount[slot] - (1 if adapter_id in pins else 0)
            resident[adapter_id] = ResidentAdapter(
                "device", self._slot_digest.get(slot, ""), adapter_id in pins, refs + running.get(adapter_id, 0),
                old.get(adapter_id, 0), self._nbytes(adapter_id), self._version_stamp.get(adapter_id, ()))
        for adapter_id, adapter in self._host.items():
            if adapter_id not in resident:
                resident[adapter_id] = ResidentAdapter("host", adapter.digest, False, running.get(adapter_id, 0),
                                                       old.get(adapter_id, 0), adapter.nbytes, adapter.stamp)
        for adapter_id in old.keys() - resident.keys():  # only old versions left (unloaded, deleted, replaced)
            resident[adapter_id] = ResidentAdapter("device", "", False, running[adapter_id], old[adapter_id])
        self.snapshot = AdapterResidency(
            device=distinct(pool.slot_of),
            host=distinct(self._host),
            running=distinct(a for a, r in resident.items() if r.requests_running > 0),
            waiting=self._waiting,
            max_loras=pool.num_slots,
            published_at=time.time(),
            resident=MappingProxyType(resident),
            deleted=MappingProxyType(dict(self._deleted)),
            last_used=MappingProxyType(dict(self._last_used)),
            errors=MappingProxyType({i: (stamp, str(err)) for i, (stamp, err) in self._failed.items()}),
            pinned=len(pins),
            slots_used=pool.slots_used + len(self._retired),
            host_bytes=sum(a.nbytes for a in self._host.values()),
            device_bytes=pool.slot_nbytes * (len(pool.slot_of) + len(self._retired)) + pool.saved_nbytes,
        )

    def _nbytes(self, adapter_id: str) -> int:
        adapter = self._host.get(adapter_id)
        return adapter.nbytes if adapter is not None else 0

    # --- commands ---------------------------------------------------------------------------------

    def _on_load(self, command: Load) -> None:
        adapter_id = command.adapter_id
        self._check_not_deleted(adapter_id)
        self.store.path_for(adapter_id)
        if command.pin and adapter_id not in self._pinned and len(self._pinned) >= self.max_pins:
            raise LimitExceededError(
                f"{len(self._pinned)} adapters are pinned, the most this server allows (--max-loras - 1 = "
                f"{self.max_pins}), so that unpinned traffic always has a slot; unpin one first")
        report = command.report
        self._retire_if_changed(adapter_id)
        slot = self.pool.lookup(adapter_id)
        if slot is None:
            adapter = self._host_copy(adapter_id)
            if adapter is None:
                failed = self._failed_error(adapter_id)
                if failed is not None:
                    raise failed
                if self.pool.has_idle_slot():
                    self._start_load(adapter_id)
                # else every slot is held by running requests: read it once one frees. Reading now,
                # several waiting Loads beyond the host cache's size evict each other's copies and
                # re-read from disk every iteration (tests/test_adapter_manager.py, seed 11).
                self._pending_loads.append(command)  # answered when the read lands (LoadDone)
                return
            started = time.perf_counter()
            slot = self._put_on_device(adapter, take=False)
            if slot is None:  # every slot is held by running requests: try again next iteration
                self._pending_loads.append(command)
                return
            report.device_seconds = time.perf_counter() - started
        if command.pin and adapter_id not in self._pinned:
            self.pool.acquire_resident(adapter_id)  # the pin's own reference
            self._pinned.add(adapter_id)
        report.digest = self._slot_digest[slot]
        self.observer.adapter_event("load")
        self._answer(command, report)

    def _on_unpin(self, command: Unpin) -> None:
        self.store.path_for(command.adapter_id)
        self._unpin(command.adapter_id)
        self._answer(command, None)

    def _unpin(self, adapter_id: str) -> None:
        if adapter_id in self._pinned:
            self._pinned.discard(adapter_id)
            self.release(self.pool.slot_of[adapter_id])

    def _on_unload(self, command: Unload) -> None:
        self.store.path_for(command.adapter_id)
        self._drain(command, "unload")

    def _on_delete(self, command: Delete) -> None:
        adapter_id = command.adapter_id
        self._deleted[adapter_id] = files_stamp(self.store.path_for(adapter_id))
        self.fail_waiting(adapter_id, AdapterNotFoundError(f"adapter {adapter_id!r} not found (it was deleted)"))
        self._drain(command, "delete")

    def _on_published(self, command: Published) -> None:
        adapter_id = command.adapter_id
        self._deleted.pop(adapter_id, None)
        self._failed.pop(adapter_id, None)
        held = self._version_digest(adapter_id)
        if held and held != command.digest:
            pinned = adapter_id in self._pinned
            self._retire(adapter_id)
            if pinned:  # the pin moves to the new version once it is read
                repin = Load(adapter_id, pin=True)
                repin.done.add_done_callback(_log_lost_pin)
                self._pending_loads.append(repin)
                self._start_load(adapter_id)
        self._answer(command, None)

    def _on_undelete(self, command: Undelete) -> None:
        self._deleted.pop(command.adapter_id, None)
        self._answer(command, None)

    def _check_not_deleted(self, adapter_id: str) -> None:
        """Raise NOT_FOUND for a deleted id whose deleted files are still there; drop the mark
        once they are not (gone for good: path_for says NOT_FOUND; back with new files: serve)."""
        if adapter_id not in self._deleted:
            return
        try:
            path = self.store.path_for(adapter_id)
        except AdapterNotFoundError:
            return  # keep the mark while the folder is away (mid-delete); NOT_FOUND comes anyway
        if _still_deleted(self._deleted, adapter_id, path):
            raise AdapterNotFoundError(f"adapter {adapter_id!r} not found (it was deleted)")
        log.info("adapter %s: new files where a deleted version was; serving them", adapter_id)
        del self._deleted[adapter_id]
        self._dirty = True

    def _drain(self, command: Command, kind: str) -> None:
        """Unload / delete: unpin, retire every version; answer once their slots are free."""
        adapter_id = command.adapter_id
        report = DrainReport(self._version_digest(adapter_id))
        report.freed_host_bytes = self._nbytes(adapter_id)
        self._unpin(adapter_id)
        slot = self.pool.lookup(adapter_id)
        report.freed_slot = slot is not None
        self._retire(adapter_id)
        busy = {s for s, owner in self._retired.items() if owner == adapter_id}
        report.requests_drained = sum(self.pool.refcount[s] for s in busy)
        self.observer.adapter_event(kind)
        self._drains.append(_Drain(command, report, busy))
        self._finish_drains()

    def _finish_drains(self) -> None:
        kept = []
        for drain in self._drains:
            if drain.slots & self._retired.keys():
                kept.append(drain)
                continue
            drain.report.seconds = time.perf_counter() - drain.command.started
            self._answer(drain.command, drain.report)
        self._drains = kept

    # --- versions ---------------------------------------------------------------------------------

    def _version_digest(self, adapter_id: str) -> str:
        slot = self.pool.lookup(adapter_id)
        if slot is not None:
            return self._slot_digest.get(slot, "")
        adapter = self._host.get(adapter_id)
        return adapter.digest if adapter is not None else ""

    def _retire(self, adapter_id: str) -> None:
        """Stop serving the resident version: drop its host copy, retire its slot (freed when
        its last request ends), make a read in flight stale."""
        self._current_gen[adapter_id] = next(self._generation)
        self._loading.pop(adapter_id, None)
        self._host.pop(adapter_id, None)
        self._version_stamp.pop(adapter_id, None)
        if adapter_id in self._pinned:
            self._unpin(adapter_id)
        slot = self.pool.lookup(adapter_id)
        if slot is not None:
            if self.pool.refcount[slot] > 0:
                self._retired[slot] = adapter_id
            else:
                self._slot_digest.pop(slot, None)
            self.pool.retire(adapter_id)
        self._dirty = True

    def _retire_if_changed(self, adapter_id: str) -> None:
        """Files changed on disk by hand (not through an upload): serve the new files."""
        digest = self._version_digest(adapter_id)
        if not digest:
            return
        try:
            path = self.store.path_for(adapter_id)
        except LoradError:
            return
        if files_stamp(path) != self._version_stamp.get(adapter_id):
            log.info("adapter %s: files changed on disk; retiring version %s", adapter_id, digest[:19])
            self._retire(adapter_id)

    # --- host and device --------------------------------------------------------------------------

    def _host_copy(self, adapter_id: str) -> LoadedAdapter | None:
        adapter = self._host.get(adapter_id)
        if adapter is not None:
            self._host.move_to_end(adapter_id)
        return adapter

    def _put_on_device(self, adapter: LoadedAdapter, take: bool = True) -> int | None:
        started = time.perf_counter()
        pinned = frozenset(self.pool.slot_of[a] for a in self._pinned if a in self.pool.slot_of)
        slot = self.pool.acquire_load(adapter, pinned)
        if slot is None:
            return None
        self._slot_digest[slot] = adapter.digest
        self.observer.adapter_loaded("device", time.perf_counter() - started)
        if not take:
            self.release(slot)
        self._dirty = True
        return slot

    def _bound_host_cache(self) -> None:
        """Drop least recently used host copies past host_capacity adapters or host_bytes bytes;
        the most recent (the one just read) always stays, whatever its size."""
        held = sum(a.nbytes for a in self._host.values())
        while len(self._host) > 1 and (len(self._host) > self.host_capacity
                                       or (self.host_bytes is not None and held > self.host_bytes)):
            evicted, adapter = self._host.popitem(last=False)
            held -= adapter.nbytes
            log.info("host cache: evicted adapter %s (%d MiB)", evicted, adapter.nbytes >> 20)

    def _failed_error(self, adapter_id: str) -> InvalidAdapterError | None:
        failed = self._failed.get(adapter_id)
        if failed is None:
            return None
        try:
            stamp = files_stamp(self.store.path_for(adapter_id))
        except LoradError:
            return None
        return failed[1] if failed[0] == stamp else None

    def _start_load(self, adapter_id: str) -> None:
        if adapter_id in self._loading:
            return
        failed = self._failed_error(adapter_id)
        generation = self._current_gen.setdefault(adapter_id, next(self._generation))
        future: Future
        if failed is not None:  # fails again at once until its files change
            future = Future()
            future.set_exception(failed)
        else:
            future = self._loader.submit(self.store.read, adapter_id)
        self._loading[adapter_id] = generation
        future.add_done_callback(lambda f: self._post_quietly(LoadDone(adapter_id, generation, f)))

    def _post_quietly(self, message: LoadDone) -> None:
        """Loader thread: hand a read's result to the model thread, unless it has stopped."""
        try:
            self.post(message)
        except EngineStoppedError:
            pass

    def _load_done(self, message: LoadDone) -> None:
        adapter_id = message.adapter_id
        if self._loading.get(adapter_id) == message.generation:
            del self._loading[adapter_id]
        stale = message.generation != self._current_gen.get(adapter_id)
        exc = message.future.exception()
        if stale:  # retired while it was read: requests waiting for it start a new read
            return
        if isinstance(exc, ChangedWhileRead) and self._rereads.get(adapter_id, 0) < MAX_REREADS:
            # a replace (or a copy) landed during the read: the waiting requests get the new
            # files, not an error; bounded, so a folder rewritten without end still fails
            self._rereads[adapter_id] = self._rereads.get(adapter_id, 0) + 1
            self._start_load(adapter_id)
            return
        self._rereads.pop(adapter_id, None)
        if exc is None:
            adapter = message.future.result()
            self._failed.pop(adapter_id, None)
            self._host[adapter_id] = adapter
            self._host.move_to_end(adapter_id)
            self._version_stamp[adapter_id] = adapter.stamp
            self._bound_host_cache()
            self.observer.adapter_loaded("host", adapter.load_seconds)
            log.info("loaded adapter %s (rank %d, %d modules, %s)", adapter_id, adapter.spec.rank,
                     len(adapter.weights), adapter.digest[:19])
        else:
            error = exc if isinstance(exc, LoradError) else InvalidAdapterError(
                f"adapter {adapter_id!r} could not be loaded ({type(exc).__name__}); see the server log")
            if isinstance(error, InvalidAdapterError) and not isinstance(error, ChangedWhileRead):
                try:
                    self._failed[adapter_id] = (files_stamp(self.store.path_for(adapter_id)), error)
                except LoradError:
                    pass
            self.fail_waiting(adapter_id, error)
        waiting, self._pending_loads = self._pending_loads, []
        for command in waiting:
            if command.adapter_id == adapter_id and exc is not None:
                if not command.done.done():
                    command.done.set_exception(self._failed_error(adapter_id) or error)
            elif command.adapter_id == adapter_id:
                command.report.host_seconds = command.report.host_seconds or adapter.load_seconds
                self.handle(command)
            else:
                self._pending_loads.append(command)

    # --- checks (tests) ---------------------------------------------------------------------------

    def check_invariants(self, running_slots: list[int]) -> None:
        """Assert the slot table agrees with the requests running on it (the engine passes the
        slot of every running request). For tests; O(slots + requests)."""
        pool = self.pool
        expected = [0] * pool.num_slots
        for slot in running_slots:
            if slot >= 0:
                expected[slot] += 1
        for adapter_id in self._pinned:
            assert adapter_id in pool.slot_of, f"pinned {adapter_id} has no slot"
            expected[pool.slot_of[adapter_id]] += 1
        assert pool.refcount == expected, f"slot refcounts {pool.refcount} != running + pins {expected}"
        assert len(self._pinned) <= self.max_pins
        for slot in range(pool.num_slots):
            assert (slot in pool._idle) == (pool.refcount[slot] == 0), f"slot {slot}: idle list disagrees"
            owner = pool.adapter_in[slot]
            if owner is not None:
                assert pool.slot_of[owner] == slot and slot not in self._retired
                assert slot in self._slot_digest
            if slot in self._retired:
                assert pool.refcount[slot] > 0, f"retired slot {slot} is idle but still listed"
        assert len(pool.slot_of) == len(set(pool.slot_of.values()))
        assert pool.saved_budget is None or pool.saved_nbytes <= pool.saved_budget, "saved copies over budget"



