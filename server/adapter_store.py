"""Where adapters come from: the folder on disk and the host-memory LRU in front of it.

    disk (--adapters DIR, one sub-folder per adapter id)
      -> host cache (--max-cpu-loras, validated tensors in the file's dtype, LRU)
        -> device slots (--max-loras, lorad.server.lora_slots)

Reading and validating from disk runs on a background thread so the engine keeps stepping
while an adapter loads; the engine copies a loaded adapter into a slot between two steps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from lorad.adapter_format import CONFIG_FILE, AdapterSpec, LoadedAdapter, inspect_adapter, load_adapter, validate_adapter_id
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
        # adapter id -> (files' mtime, error) of the last failed load; listed until the files change
        self._failed: dict[str, tuple[int, InvalidAdapterError]] = {}
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
        if path.parent != self.root:  # a symlink pointing out of the adapters folder
            raise AdapterNotFoundError(f"adapter {adapter_id!r} not found in {self.root}")
        if not (path / CONFIG_FILE).is_file():
            raise AdapterNotFoundError(f"adapter {adapter_id!r} not found in {self.root}")
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
        return ids

    def inspect(self, adapter_id: str) -> AdapterSpec:
        """Header-level validation; also reports the error of a failed load of unchanged files."""
        path = self.path_for(adapter_id)
        with self._lock:
            failed = self._failed.get(adapter_id)
        if failed is not None and failed[0] == _files_mtime(path):
            raise failed[1]
        return inspect_adapter(path, adapter_id, self.geometry, self.max_rank)

    # --- host cache -------------------------------------------------------------------------

    def cached(self, adapter_id: str) -> LoadedAdapter | None:
        """The host copy, marking it most recently used; None if not in host memory."""
        with self._lock:
            adapter = self._host.get(adapter_id)
            if adapter is not None:
                self._host.move_to_end(adapter_id)
            return adapter

    def in_host(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._host

    def host_ids(self) -> list[str]:
        with self._lock:
            return list(self._host)

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
        if failed is not None and failed[0] == _files_mtime(self.root / adapter_id):
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
        try:
            adapter = load_adapter(self.path_for(adapter_id), adapter_id, self.geometry, self.max_rank)
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
        except AdapterNotFoundError:
            raise
        except Exception as exc:  # an unexpected reader failure still becomes an adapter error
            error = exc if isinstance(exc, InvalidAdapterError) else InvalidAdapterError(
                f"adapter {adapter_id!r} could not be loaded: {exc}")
            with self._lock:
                self._failed[adapter_id] = (_files_mtime(self.root / adapter_id), error)
            raise error from exc
        finally:
            with self._lock:
                self._loading.pop(adapter_id, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _files_mtime(path: Path) -> int:
    """Newest modification time of an adapter folder's files (0 if unreadable)."""
    try:
        return max((f.stat().st_mtime_ns for f in path.iterdir()), default=0)
    except OSError:
        return 0
