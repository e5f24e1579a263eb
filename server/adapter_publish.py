"""Adapter versions on disk: content digests, and atomic publishing into the adapters folder.

    ADAPTERS/
      <id>/                             published adapters: what the server serves
      .lorad-upload-<id>-<random>/      an upload being received
      .lorad-trash/<op>-<id>-<random>/  a replaced or deleted version, removed once renamed out
      .lorad-publish.lock               held while folders are renamed (several servers may share ADAPTERS)

Names starting with '.' are never adapter ids (lorad.adapter_format.ADAPTER_ID_PATTERN), so
nothing in a staging or trash folder is ever listed or served.

Publishing an upload: the files are written into a staging folder in the SAME parent as the
published folders (rename is atomic only within one filesystem; a temp dir under /tmp would
be a copy, EXDEV), each file fsynced, validated exactly like a folder adapter, the folder
fsynced, renamed into place, the parent fsynced. A replace swaps the two folders in one
renameat2(RENAME_EXCHANGE) (Linux), so a reader finds the old version or the new one, never no
folder; the old one, now under the staging name, is then renamed into the trash. Where the
filesystem cannot exchange, it falls back to two renames (old out, new in) under the publish
lock, and a reader that finds no folder looks again holding that lock
(lorad.server.adapter_store).
The id is never half a folder. Delete renames the folder out first and removes it after.

Crash safety (SIGKILL anywhere): an upload's staging folder holds an flock while it is written;
`recover()` at start removes staging folders nobody holds, puts back an old version whose
replace stopped between its two renames, and empties the trash.

Nothing here knows gRPC; errors are lorad.errors types.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lorad.adapter_format import CONFIG_FILE, PICKLE_FILES, WEIGHTS_FILE, adapter_stamp, validate_adapter_id
from lorad.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    IntegrityError,
    InvalidAdapterError,
    InvalidRequestError,
    LimitExceededError,
    ReadOnlyAdaptersError,
)
from lorad.files import fsync_path, sha256_file
from lorad.server.base_match import PROVENANCE_FILE
from lorad.server.config import ServerConfig

log = logging.getLogger(__name__)

# The files that make an adapter version, in the order the digest reads them.
DIGEST_FILES = (CONFIG_FILE, WEIGHTS_FILE, PROVENANCE_FILE)
UPLOAD_FILES = DIGEST_FILES
JSON_FILES = (CONFIG_FILE, PROVENANCE_FILE)

STAGING_PREFIX = ".lorad-upload-"
TRASH_DIR = ".lorad-trash"
LOCK_FILE = ".lorad-publish.lock"
_STAGING_LOCK = ".lock"


# --- atomic swap ------------------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _load_renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28, or not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where the OS or the
    filesystem cannot, and then nothing moved. The standard library has no binding for it."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@contextlib.contextmanager
def renames_paused(root: Path):
    """Hold off every publisher (of any process) from renaming folders under root for the block:
    a reader that found an id's folder missing looks once more inside it."""
    try:
        handle = open(root / LOCK_FILE, "rb")
    except FileNotFoundError:  # nothing was ever published here
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_SH)
        yield


# --- digests ----------------------------------------------------------------------------------


def combine_digests(file_digests: dict[str, str]) -> str:
    """The version digest from per-file sha256 hex digests: sha256 over
    "<name>\\0<file sha256>\\n" for each present file of DIGEST_FILES, in that order."""
    total = hashlib.sha256()
    for name in DIGEST_FILES:
        if name in file_digests:
            total.update(f"{name}\0{file_digests[name]}\n".encode())
    return "sha256:" + total.hexdigest()


def adapter_digest(path: str | Path) -> str:
    """Content digest of an adapter folder ("sha256:<hex>"): equal digests mean equal files."""
    path = Path(path)
    return combine_digests({name: sha256_file(path / name) for name in DIGEST_FILES if (path / name).is_file()})


# --- limits -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadLimits:
    """max_bytes: all files of one upload together; max_json_bytes: adapter_config.json and
    lorad_provenance.json each; max_concurrent: uploads received at once (more are refused)."""

    max_bytes: int = ServerConfig.max_upload_bytes  # the flag's default, one copy
    max_json_bytes: int = 2**20
    max_concurrent: int = 2


@dataclass
class Published:
    adapter_id: str
    path: Path
    digest: str
    bytes_received: int
    replaced: bool = False
    previous_digest: str = ""
    previous_trash: Path | None = None  # the replaced version, renamed out; purge() it when done


# --- the publisher ----------------------------------------------------------------------------


class AdapterPublisher:
    """Uploads, replaces and deletes adapter folders under one root, atomically."""

    def __init__(self, root: str | Path, limits: UploadLimits | None = None):
        self.root = Path(root).resolve()
        self.limits = limits or UploadLimits()
        self.trash = self.root / TRASH_DIR
        self._lock = threading.Lock()  # this process's renames; the flock covers other processes
        self._active = 0

    @contextlib.contextmanager
    def _renaming(self):
        with self._lock, open(self.root / LOCK_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _check_id(self, adapter_id: str) -> None:
        try:
            validate_adapter_id(adapter_id)
        except ValueError as exc:
            raise InvalidRequestError(f"id: {exc}") from exc

    def writable(self) -> bool:
        """False on a read-only adapters folder (a read-only volume shared by replicas): the server
        still serves what is there; uploads, replaces, deletes and combines are refused. A folder
        not made yet is writable where its nearest existing parent is (the first upload makes it)."""
        path = self.root
        while not path.exists() and path != path.parent:
            path = path.parent
        return os.access(path, os.W_OK)

    def check_writable(self) -> None:
        if not self.writable():
            raise ReadOnlyAdaptersError("the adapters folder of this server is read-only, so adapters cannot be "
                                        "uploaded, replaced, deleted or combined here; publish through a replica "
                                        "that mounts it writable, or copy the folder in")

    def exists(self, adapter_id: str) -> bool:
        return (self.root / adapter_id / CONFIG_FILE).is_file()

    # --- start-up ---------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Repair what a crash left behind; returns one line per action, for the log."""
        actions: list[str] = []
        if not self.root.is_dir():
            return actions
        if not self.writable():
            return [f"{self.root} is read-only: serving the adapters in it; uploads, replaces, deletes and "
                    "combines will be refused"]
        with self._renaming():
            for child in sorted(self.root.iterdir()):
                if child.name.startswith(STAGING_PREFIX) and child.is_dir() and not _held(child):
                    shutil.rmtree(child, ignore_errors=True)
                    actions.append(f"removed an interrupted upload ({child.name})")
            if self.trash.is_dir():
                for entry in sorted(self.trash.iterdir()):
                    op, _, rest = entry.name.partition("-")
                    adapter_id = rest.rsplit("-", 1)[0]
                    target = self.root / adapter_id
                    if op == "replace" and not target.exists():
                        os.replace(entry, target)
                        actions.append(f"restored adapter {adapter_id!r}: its replace was interrupted")
                        continue
                    shutil.rmtree(entry, ignore_errors=True)
                    actions.append(f"removed {entry.name} from {TRASH_DIR}")
        return actions

    # --- upload -----------------------------------------------------------------------------

    def begin(self, adapter_id: str, replace: bool = False, expected_digest: str = "") -> "Upload":
        """Start receiving an upload; refuses a bad id, an existing id without replace, and one
        upload too many."""
        self._check_id(adapter_id)
        self.check_writable()
        if not replace and self.exists(adapter_id):
            raise AdapterExistsError(f"adapter {adapter_id!r} already exists; upload with replace (--replace on the CLI) "
                                     "to replace it")
        with self._lock:
            if self._active >= self.limits.max_concurrent:
                raise LimitExceededError(
                    f"{self._active} uploads are already being received (the limit); retry when one has finished")
            self._active += 1
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging = self.root / f"{STAGING_PREFIX}{adapter_id}-{secrets.token_hex(4)}"
            staging.mkdir()
            return Upload(self, adapter_id, replace, expected_digest, staging)
        except BaseException:
            self._release_slot()
            raise

    def _release_slot(self) -> None:
        with self._lock:
            self._active -= 1

    def _publish(self, upload: "Upload", digest: str) -> Published:
        target = self.root / upload.adapter_id
        published = Published(upload.adapter_id, target, digest, upload.bytes_received)
        with self._renaming():
            if target.exists():
                if not upload.replace:
                    raise AdapterExistsError(f"adapter {upload.adapter_id!r} already exists; upload with replace "
                                             "(--replace on the CLI) to replace it")
                published.replaced = True
                if exchange(upload.staging, target):  # the old version is now under the staging name
                    published.previous_trash = self._to_trash(upload.staging, upload.adapter_id, "replace")
                else:
                    published.previous_trash = self._rename_out(upload.adapter_id, "replace")
                    os.replace(upload.staging, target)
            else:
                os.replace(upload.staging, target)
            fsync_path(self.root)
        if published.replaced:  # read outside the lock: readers of a missing folder wait on it
            published.previous_digest = adapter_digest(published.previous_trash)
        log.info("published adapter %s (%s)%s", upload.adapter_id, digest,
                 f", replacing {published.previous_digest}" if published.replaced else "")
        return published

    # --- delete -----------------------------------------------------------------------------

    def _rename_out(self, adapter_id: str, op: str) -> Path:
        return self._to_trash(self.root / adapter_id, adapter_id, op)

    def _to_trash(self, folder: Path, adapter_id: str, op: str) -> Path:
        self.trash.mkdir(exist_ok=True)
        out = self.trash / f"{op}-{adapter_id}-{secrets.token_hex(4)}"
        os.replace(folder, out)
        fsync_path(self.root)
        return out

    def retire(self, adapter_id: str) -> Path:
        """Rename an adapter's folder out of the adapters folder (the first half of a delete);
        returns where it went, for purge()."""
        self._check_id(adapter_id)
        with self._renaming():
            if not (self.root / adapter_id).is_dir():
                raise AdapterNotFoundError(f"adapter {adapter_id!r} not found")
            return self._rename_out(adapter_id, "delete")

    def purge(self, trash_path: Path | None) -> None:
        """Remove a renamed-out version for good (the second half)."""
        if trash_path is not None and trash_path.parent == self.trash:
            shutil.rmtree(trash_path, ignore_errors=True)


def _held(staging: Path) -> bool:
    """Whether a live process still writes this staging folder (it holds the folder's flock)."""
    try:
        handle = open(staging / _STAGING_LOCK, "a")
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


class Upload:
    """One upload being received into its staging folder. Use as a context manager: leaving it
    without finish() (an error, a client that went away) removes everything it wrote.

    finish() may run on a worker thread while the caller leaves the context (a client that
    cancelled mid-validation): once finish has started, abort() does nothing and finish alone
    publishes or cleans up, so the staging folder is never removed under the validator and the
    publisher's upload slot is released exactly once."""

    def __init__(self, publisher: AdapterPublisher, adapter_id: str, replace: bool, expected_digest: str, staging: Path):
        self.publisher = publisher
        self.adapter_id = adapter_id
        self.replace = replace
        self.expected_digest = expected_digest
        self.staging = staging
        self.bytes_received = 0
        self._lock_handle = open(staging / _STAGING_LOCK, "a")
        fcntl.flock(self._lock_handle, fcntl.LOCK_EX)
        self._file = None
        self._name: str | None = None
        self._sizes: dict[str, int] = {}
        self._hashes: dict[str, "hashlib._Hash"] = {}
        self._state = threading.Lock()  # guards _done / _finishing: finish and abort race on cancel
        self._io = threading.Lock()  # held by a write (a worker thread) while abort may come from the caller
        self._done = False  # published or cleaned up; the upload slot is released
        self._finishing = False  # finish() owns the outcome from here on

    def __enter__(self) -> "Upload":
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            self.abort()

    def write(self, name: str, data: bytes) -> None:
        """Append a chunk to file `name`; a file's chunks come in order, one file after another."""
        with self._io:
            if self._done or self._finishing:
                raise InvalidRequestError(f"the upload of {self.adapter_id!r} was already finished or abandoned")
            self._write(name, data)

    def _write(self, name: str, data: bytes) -> None:
        if name != self._name:
            if name in PICKLE_FILES:
                raise InvalidAdapterError(
                    f"{name}: lorad never unpickles weights; send adapter_model.safetensors (PEFT's save_pretrained "
                    "writes it by default)")
            if name not in UPLOAD_FILES:
                raise InvalidRequestError(f"chunk name {name!r} is not one of {', '.join(UPLOAD_FILES)}")
            if name in self._sizes:
                raise InvalidRequestError(f"chunks of {name} must be sent one after the other, not interleaved")
            self._close_file()
            self._name = name
            self._sizes[name] = 0
            self._hashes[name] = hashlib.sha256()
            self._file = open(self.staging / name, "wb")
        limits = self.publisher.limits
        self._sizes[name] += len(data)
        self.bytes_received += len(data)
        if name in JSON_FILES and self._sizes[name] > limits.max_json_bytes:
            raise LimitExceededError(f"{name} is larger than {limits.max_json_bytes} bytes, this server's limit")
        if self.bytes_received > limits.max_bytes:
            raise LimitExceededError(
                f"the upload is larger than {limits.max_bytes} bytes, this server's limit (--max-upload-bytes)")
        self._file.write(data)
        self._hashes[name].update(data)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    @property
    def digest(self) -> str:
        return combine_digests({name: h.hexdigest() for name, h in self._hashes.items()})

    def finish(self, validate: Callable[[Path], object]) -> Published:
        """Validate the received folder with `validate(path)` (raises to refuse), then publish it."""
        with self._state:
            if self._done or self._finishing:
                raise InvalidRequestError(f"the upload of {self.adapter_id!r} was already finished or abandoned")
            self._finishing = True
        published = None
        try:
            self._close_file()
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                if name not in self._sizes:
                    raise InvalidAdapterError(f"adapter {self.adapter_id!r}: the upload has no {name}")
            digest = self.digest
            if self.expected_digest and self.expected_digest != digest:
                raise IntegrityError(
                    f"the received files have digest {digest}, not the announced {self.expected_digest}; "
                    "nothing was published")
            validate(self.staging)
            self._lock_handle.close()  # the flock goes with it: a folder about to be renamed
            (self.staging / _STAGING_LOCK).unlink()
            fsync_path(self.staging)
            published = self.publisher._publish(self, digest)
            return published
        finally:
            with self._state:
                self._done = True
            if published is None:
                self._remove()
            else:
                self.publisher._release_slot()

    def abort(self) -> None:
        """Remove what was received and free the upload slot; a no-op once finish() has started."""
        with self._state:
            if self._done or self._finishing:
                return
            self._done = True
        self._remove()

    def _remove(self) -> None:
        """Close, remove the staging folder, free the upload slot (once: whoever set _done)."""
        try:
            with self._io:  # a write still running on a worker thread ends first
                if self._file is not None:
                    self._file.close()
                self._lock_handle.close()
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.publisher._release_slot()


def files_stamp(path: Path) -> tuple:
    """The stamp of every file of an adapter version (lorad.adapter_format.adapter_stamp over
    DIGEST_FILES): whatever changes the digest changes it, for the cost of three stats."""
    return adapter_stamp(path, DIGEST_FILES)


class DigestMemo:
    """Version digests of adapter folders, re-read only when the files' stamp changes."""

    def __init__(self):
        self._memo: dict[Path, tuple[tuple, str]] = {}
        self._lock = threading.Lock()

    def digest(self, path: Path) -> str:
        key = files_stamp(path)
        with self._lock:
            hit = self._memo.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        digest = adapter_digest(path)
        with self._lock:
            self._memo[path] = (key, digest)
        return digest

