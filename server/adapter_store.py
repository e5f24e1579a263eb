"""Where adapters come from: the folder on disk and the host-memory LRU in front of it.

    disk (--adapters DIR, one sub-folder per adapter id)
      -> host cache (--max-cpu-loras, validated tensors in the file's dtype, LRU)
        -> device slots (--max-loras, lorad.server.lora_slots)

Reading and validating from disk runs on a background thread so the engine keeps stepping
while an adapter loads; the engine copies a loaded adapter into a slot between two steps.

Every copy remembers the stamp of the files it was read from (lorad.adapter_format.adapter_stamp).
When the files change on disk, the host copy is dropped and the next request reads the new
files; the engine does the same for the device slot. Results of header checks (for listing)
and failed loads are kept per stamp too, so a broken adapter is read once per version of its
files, not once per request or per listing.

Client-facing messages name the adapter id, never a server path; paths go to the log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from lorad.adapter_format import (
    CONFIG_FILE,
    AdapterSpec,
    LoadedAdapter,
    adapter_stamp,
    inspect_adapter,
    load_adapter,
    validate_adapter_id,
)
from lorad.errors import AdapterNotFoundError, InvalidAdapterError, InvalidRequestError
from lorad.geometry import ModelGeometry

log = logging.getLogger(__name__)


class AdapterStore:
    def __init__(self, root: str | Path | None, geometry: ModelGeometry, max_rank: int, host_capacity: int):
        self.root = Path(root).resolve() if root else None
        self.geometry = geometry
        self.max_rank = max_rank
        self.host_capacity = host_capacity
        self._host: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._loading: dict[str, Future] = {}
        # adapter id -> (stamp, error) of the last failed load; it fails again until the files change
        self._failed: dict[str, tuple[tuple, InvalidAdapterError]] = {}
        # adapter id -> (stamp, spec or error) of the last header check (listing)
        self._inspected: dict[str, tuple[tuple, AdapterSpec | InvalidAdapterError]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorad-adapter-loader")

    # --- disk -------------------------------------------------------------------------------

    def path_for(self, adapter_id: str) -> Path:
        """The folder of an adapter; raises for bad ids and unknown adapters."""
        try:
            validate_adapter_id(adapter_id)
        except ValueError as exc:
            raise InvalidRequestError(f"adapter_id: {exc}") from exc
        if self.root is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} not found: this server was started without --adapters")
        path = (self.root / adapter_id).resolve()
        # a folder that is a symlink out of the adapters folder is not an adapter of this server
        if path.parent != self.root or not (path / CONFIG_FILE).is_file():
            raise AdapterNotFoundError(f"adapter {adapter_id!r} not found")
        return path

    def list_ids(self) -> list[str]:
        if self.root is None or not self.root.is_dir():
            return []
        ids = []
        for child in sorted(self.root.iterdir()):
            try:
                validate_adapter_id(child.name)
            except ValueError:
                continue
            if (child / CONFIG_FILE).is_file():
                ids.append(child.name)
        with self._lock:  # forget what was cached for folders that are gone
            for gone in set(self._inspected) - set(ids):
                del self._inspected[gone]
        return ids

    def stamp(self, adapter_id: str) -> tuple:
        """The current stamp of an adapter's files (see adapter_format.adapter_stamp)."""
        return adapter_stamp(self.root / adapter_id) if self.root is not None else ()

    def inspect(self, adapter_id: str) -> AdapterSpec:
        """Header-level validation (cached per version of the files); also reports the error of
        a failed load of the same files. Raises InvalidAdapterError or AdapterNotFoundError only."""
        path = self.path_for(adapter_id)
        stamp = self.stamp(adapter_id)
        with self._lock:
            failed = self._failed.get(adapter_id)
            seen = self._inspected.get(adapter_id)
        if failed is not None and failed[0] == stamp:
            raise failed[1]
        if seen is not None and seen[0] == stamp:
            result = seen[1]
        else:
            try:
                result = inspect_adapter(path, adapter_id, self.geometry, self.max_rank, root=self.root)
            except InvalidAdapterError as exc:
                result = exc
            except Exception as exc:  # a reader bug must not turn into a failed listing for everyone
                log.exception("inspecting adapter %s at %s failed", adapter_id, path)
                result = InvalidAdapterError(f"adapter {adapter_id!r} could not be read ({type(exc).__name__}); "
                                             "see the server log")
            with self._lock:
                self._inspected[adapter_id] = (stamp, result)
        if isinstance(result, InvalidAdapterError):
            raise result
        return result

    # --- host cache -------------------------------------------------------------------------

    def cached(self, adapter_id: str, stamp: tuple | None = None) -> LoadedAdapter | None:
        """The host copy, marking it most recently used; None if not in host memory or if it
        was read from files that have changed since (the stale copy is dropped)."""
        stamp = self.stamp(adapter_id) if stamp is None else stamp
        with self._lock:
            adapter = self._host.get(adapter_id)
            if adapter is None:
                return None
            if adapter.stamp != stamp:
                del self._host[adapter_id]
                log.info("adapter %s: files changed on disk; dropped the host copy", adapter_id)
                return None
            self._host.move_to_end(adapter_id)
            return adapter

    def in_host(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._host

    def host_stamp(self, adapter_id: str) -> tuple | None:
        with self._lock:
            adapter = self._host.get(adapter_id)
            return adapter.stamp if adapter is not None else None

    def is_loading(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._loading

    def load_async(self, adapter_id: str, on_done=None) -> Future:
        """Start reading an adapter into host memory (once, however often asked).

        An adapter whose last load failed fails again at once until its files change.
        """
        with self._lock:
            future = self._loading.get(adapter_id)
            failed = self._failed.get(adapter_id) if future is None else None
        if failed is not None and failed[0] == self.stamp(adapter_id):
            future = Future()
            future.set_exception(failed[1])
            if on_done is not None:
                on_done(adapter_id, future)
            return future
        with self._lock:
            future = self._loading.get(adapter_id)
            if future is None:
                future = self._pool.submit(self._load, adapter_id)
                self._loading[adapter_id] = future
        if on_done is not None:
            future.add_done_callback(lambda f: on_done(adapter_id, f))
        return future

    def _load(self, adapter_id: str) -> LoadedAdapter:
        started = time.perf_counter()
        stamp = self.stamp(adapter_id)
        try:
            path = self.path_for(adapter_id)
            adapter = load_adapter(path, adapter_id, self.geometry, self.max_rank, root=self.root)
            if self.stamp(adapter_id) != stamp:  # rewritten while read: this copy may mix versions
                raise _ChangedWhileRead(f"adapter {adapter_id!r}: its files changed while they were being read; "
                                        "retry the request")
            adapter.stamp = stamp
            adapter.load_seconds = time.perf_counter() - started
            with self._lock:
                self._failed.pop(adapter_id, None)
                self._host[adapter_id] = adapter
                self._host.move_to_end(adapter_id)
                while len(self._host) > self.host_capacity:
                    evicted, _ = self._host.popitem(last=False)
                    log.info("host cache: evicted adapter %s", evicted)
            log.info("loaded adapter %s (rank %d, %d modules)", adapter_id, adapter.spec.rank, len(adapter.weights))
            return adapter
        except (AdapterNotFoundError, InvalidRequestError, _ChangedWhileRead):
            raise  # not a property of these files: not remembered
        except Exception as exc:  # an unexpected reader failure still becomes an adapter error
            if isinstance(exc, InvalidAdapterError):
                error = exc
                log.info("adapter %s (%s) refused: %s", adapter_id, self.root / adapter_id, exc)
            else:
                log.exception("loading adapter %s from %s failed", adapter_id, self.root / adapter_id)
                error = InvalidAdapterError(f"adapter {adapter_id!r} could not be loaded ({type(exc).__name__}); "
                                            "see the server log")
            with self._lock:
                self._failed[adapter_id] = (stamp, error)
            raise error from exc
        finally:
            with self._lock:
                self._loading.pop(adapter_id, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _ChangedWhileRead(InvalidAdapterError):
    """The files changed during a load; the next request reads them again."""
