"""The disk side of adapters: the folder (--adapters DIR, one sub-folder per adapter id), the
header checks listings show, and reading an adapter's files into host tensors.

Nothing here keeps adapters in memory or decides what is resident: that is
lorad.server.adapter_manager, on the model thread. Methods here are safe on any thread;
`read` runs on the manager's loader thread (numpy only, see lorad.server.model_thread).

Results of header checks (for listing) are kept per stamp of the files, so a broken adapter is
inspected once per version of its files, not once per listing.

Client-facing messages name the adapter id, never a server path; paths go to the log.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from lorad.adapter_format import (
    CONFIG_FILE,
    AdapterSpec,
    LoadedAdapter,
    inspect_adapter,
    load_adapter,
    validate_adapter_id,
)
from lorad.errors import AdapterNotFoundError, InvalidAdapterError, InvalidRequestError
from lorad.geometry import ModelGeometry

from lorad.server.adapter_publish import adapter_digest, files_stamp, renames_paused

log = logging.getLogger(__name__)


class AdapterStore:
    def __init__(self, root: str | Path | None, geometry: ModelGeometry, max_rank: int):
        self.root = Path(root).resolve() if root else None
        self.geometry = geometry
        self.max_rank = max_rank
        # adapter id -> (stamp, spec or error) of the last header check (listing)
        self._inspected: dict[str, tuple[tuple, AdapterSpec | InvalidAdapterError]] = {}
        self._lock = threading.Lock()

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
        found = (path / CONFIG_FILE).is_file()
        if not found:  # maybe mid-replace on a filesystem without an atomic exchange: look again
            with renames_paused(self.root):
                path = (self.root / adapter_id).resolve()
                found = (path / CONFIG_FILE).is_file()
        # a folder that is a symlink out of the adapters folder is not an adapter of this server
        if path.parent != self.root or not found:
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
        """The current stamp of an adapter's files (lorad.server.adapter_publish.files_stamp)."""
        return files_stamp(self.root / adapter_id) if self.root is not None else ()

    def inspect(self, adapter_id: str) -> AdapterSpec:
        """Header-level validation (cached per version of the files). Raises InvalidAdapterError
        or AdapterNotFoundError only."""
        path = self.path_for(adapter_id)
        stamp = self.stamp(adapter_id)
        with self._lock:
            seen = self._inspected.get(adapter_id)
        if seen is not None and seen[0] == stamp:
            result = seen[1]
        else:
            try:
                result = inspect_adapter(path, adapter_id, self.geometry, self.max_rank, root=self.root)
            except InvalidAdapterError as exc:
                result = exc
            except Exception:  # a reader bug must not turn into a failed listing for everyone
                log.exception("inspecting adapter %s at %s failed", adapter_id, path)
                result = InvalidAdapterError(f"adapter {adapter_id!r} could not be read; see the server log")
            with self._lock:
                self._inspected[adapter_id] = (stamp, result)
        if isinstance(result, InvalidAdapterError):
            raise result
        return result

    # --- reading (the manager's loader thread) ----------------------------------------------

    def read(self, adapter_id: str) -> LoadedAdapter:
        """Read and validate an adapter's files into host tensors, with the content digest of
        exactly the files read (the stamp is taken before and after: a copy of files rewritten
        meanwhile could mix versions, so it is refused and the next request reads again).

        Raises AdapterNotFoundError / InvalidRequestError (not a property of these files),
        ChangedWhileRead, or InvalidAdapterError for files that cannot serve (it names the
        adapter id, never a path; an unexpected reader failure becomes one, with the details logged)."""
        started = time.perf_counter()
        path = self.path_for(adapter_id)
        stamp = files_stamp(path)
        try:
            digest = adapter_digest(path)
            adapter = load_adapter(path, adapter_id, self.geometry, self.max_rank, root=self.root)
        except (AdapterNotFoundError, InvalidRequestError):
            raise
        except InvalidAdapterError as exc:
            log.info("adapter %s (%s) refused: %s", adapter_id, path, exc)
            raise
        except Exception as exc:  # an unexpected reader failure still becomes an adapter error
            log.exception("loading adapter %s from %s failed", adapter_id, path)
            raise InvalidAdapterError(f"adapter {adapter_id!r} could not be loaded; see the server log") from exc
        if files_stamp(path) != stamp:
            raise ChangedWhileRead(f"adapter {adapter_id!r}: its files changed while they were being read; "
                                   "retry the request")
        adapter.stamp = stamp
        adapter.digest = digest
        adapter.load_seconds = time.perf_counter() - started
        return adapter


class ChangedWhileRead(InvalidAdapterError):
    """The files changed during a read; not remembered: the next request reads them again."""
