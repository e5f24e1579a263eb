"""Combining and merging adapters on a running server: the work behind AdapterManager's
CombineAdapters and MergeAdapter.

The math, the reading and the ONE adapter writer are lorad.deltas'; this module only joins them
to the adapters folder and the atomic publisher:

  combine: read the inputs (lorad.deltas.adapter_io), combine them (lorad.deltas.combine), write
           the result with write_combined into a scratch folder in the publisher's trash (a
           crash leaves nothing recover() does not remove), then send its files through an
           Upload exactly as an UploadAdapter stream would: same limits, digest, validation and
           atomic publish, so the output is servable the moment the call returns.
  merge:   copy the adapter's files aside (a replace during a minutes-long merge must not mix
           versions), then lorad.deltas.export into --export-dir/<name>, verified against the
           engine serving the adapter (lorad.server.offline_reference), published atomically.

Both run on their own worker threads (DeltaJobs' executors), never on the event loop or the
model thread; serving goes on meanwhile. Merges run one at a time (one float32 copy of the base
each). Client-facing messages name adapter ids, never server paths. No gRPC here.
"""

from __future__ import annotations

import functools
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lorad.base_model import BaseModelConfig
from lorad.errors import AdapterExistsError, ConfigError, InvalidAdapterError, InvalidRequestError, LimitExceededError

from lorad.server.adapter_publish import UPLOAD_FILES, AdapterPublisher, Published

# a name under --export-dir: one path component, never '.' or '..', never hidden
OUTPUT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CHUNK = 1 << 20


@dataclass
class Combined:
    published: Published
    result: object  # lorad.deltas.combine.CombineResult
    rank: int  # largest rank written
    seconds: float


class DeltaJobs:
    """path_for(id) -> the adapter's folder (raises NOT_FOUND / INVALID_ARGUMENT errors);
    validate(id, folder) -> what an upload goes through; base: the served base (merge reads its
    files again); device: where it is served ("cuda..." means bf16 was quantized, as lorad does)."""

    def __init__(self, publisher: AdapterPublisher, path_for: Callable[[str], Path],
                 validate: Callable[[str, Path], None], max_rank: int, base: BaseModelConfig, device: str,
                 export_dir: str | None):
        self.publisher = publisher
        self.path_for = path_for
        self.validate = validate
        self.max_rank = max_rank
        self.base = base
        self.device = device
        self.export_dir = Path(export_dir).resolve() if export_dir else None
        self.combines = ThreadPoolExecutor(1, thread_name_prefix="lorad-combine")
        self.merges = ThreadPoolExecutor(1, thread_name_prefix="lorad-merge")
        self._merging = threading.Lock()

    def close(self) -> None:
        self.combines.shutdown(wait=False, cancel_futures=True)
        self.merges.shutdown(wait=False, cancel_futures=True)

    # --- combine ----------------------------------------------------------------------------

    def _read(self, ids: list[str]) -> tuple[list, dict[Path, str]]:
        from lorad.deltas.adapter_io import read_adapter

        paths = {adapter_id: self.path_for(adapter_id) for adapter_id in ids}  # NOT_FOUND before any reading
        names = {path: adapter_id for adapter_id, path in paths.items()}
        adapters = []
        for adapter_id in ids:
            try:
                adapters.append(read_adapter(paths[adapter_id]))
            except InvalidAdapterError as exc:
                raise InvalidAdapterError(_named(str(exc), names)) from None
        return adapters, names

    def combine(self, inputs: list[tuple[str, float]], config, output_id: str, replace: bool,
                cancel: threading.Event | None = None) -> Combined:
        """Combine the adapters `inputs` ((id, weight) pairs) with `config` (a CombineConfig) and
        publish the result as output_id (worker thread)."""
        from lorad.deltas.combine import combine, write_combined

        started = time.perf_counter()
        if not inputs:
            raise InvalidRequestError("inputs: name at least one adapter to combine")
        ids = [adapter_id for adapter_id, _ in inputs]
        adapters, names = self._read(ids)
        with self.publisher.begin(output_id, replace) as upload:  # a bad or taken output_id fails before the math
            try:
                result = combine(adapters, [w for _, w in inputs], config, cancel=cancel, threads=None)
            except (InvalidAdapterError, ConfigError) as exc:
                raise type(exc)(_named(str(exc), names)) from None
            rank = max((m.rank for m in result.modules), default=0)
            if rank > self.max_rank:
                hint = ("cat keeps every input rank; use method linear with a rank" if config.method == "cat"
                        else "ask for a lower rank")
                raise InvalidAdapterError(
                    f"the combination has rank {rank}, above this server's --max-lora-rank {self.max_rank}; "
                    f"{hint} (at most {self.max_rank})")
            self.publisher.trash.mkdir(exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f"combine-{output_id}-", dir=self.publisher.trash))
            try:
                write_combined(result, scratch)
                for name in UPLOAD_FILES:
                    if (scratch / name).is_file():
                        with open(scratch / name, "rb") as f:
                            while chunk := f.read(_CHUNK):
                                upload.write(name, chunk)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            published = upload.finish(lambda path: self.validate(output_id, path))
        return Combined(published, result, rank, time.perf_counter() - started)

    # --- merge ------------------------------------------------------------------------------

    def output_path(self, name: str, adapter_id: str, fmt: str) -> Path:
        if self.export_dir is None:
            raise InvalidRequestError("this server was started without --export-dir; it has nowhere to write "
                                      "merged models")
        name = name or (f"{adapter_id}.gguf" if fmt in ("gguf", "gguf-adapter") else f"{adapter_id}-merged")
        if not OUTPUT_NAME.match(name) or name.endswith("."):
            raise InvalidRequestError(
                f"output_name: {name[:80]!r} is not a plain name (letters, digits, '.', '_', '-'; no path); "
                "outputs are written only inside the server's --export-dir")
        out = self.export_dir / name
        if out.is_symlink():
            raise InvalidRequestError(f"output_name: {name!r} is a link in the export folder; lorad does not follow it")
        return out

    def submit_merge(self, adapter_id: str, fmt: str, name: str, dtype: str, outtype: str,
                     overwrite: bool) -> Future:
        """Check the request (cheap: names, files), reserve the one merge slot (LimitExceededError
        while a merge runs), then export adapter_id merged into the base under --export-dir on the
        merge thread. The future's result is lorad.deltas.export's ExportReport."""
        from lorad.deltas.export import ExportConfig

        fmt = fmt or "hf"
        out = self.output_path(name, adapter_id, fmt)
        config = ExportConfig(format=fmt, base=self.base.name, outtype=outtype or None, dtype=dtype or None,
                              from_original=self.base.quant == "none" and fmt != "gguf-adapter",
                              nf4_dtype="bf16" if str(self.device).startswith("cuda") else "fp32",
                              overwrite=overwrite)
        if out.exists() and not overwrite:
            raise AdapterExistsError(f"{out.name} already exists in the export folder; set overwrite to replace it")
        source = self.path_for(adapter_id)
        if not self._merging.acquire(blocking=False):
            raise LimitExceededError("a merge is already running on this server (one at a time); retry when it "
                                     "has finished")
        try:
            return self.merges.submit(self._merge, adapter_id, source, out, config)
        except BaseException:
            self._merging.release()
            raise

    def _merge(self, adapter_id: str, source: Path, out: Path, config):
        from lorad.deltas.adapter_io import read_adapter
        from lorad.deltas.export import export
        from lorad.server.offline_reference import engine_reference

        try:
            self.export_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".lorad-merge-input-", dir=self.export_dir) as scratch:
                copy = Path(scratch) / adapter_id  # this version, whatever a replace does meanwhile
                shutil.copytree(source, copy)
                try:
                    adapter = read_adapter(copy)
                except InvalidAdapterError as exc:
                    raise InvalidAdapterError(_named(str(exc), {copy: adapter_id})) from None
                # one thread: the serving engine already holds all cores but one; a reference
                # engine with the default would oversubscribe them and slow every request for the
                # minutes a merge takes (the merge is offline work, it may take longer)
                return export(adapter, out, config, functools.partial(engine_reference, threads=1))
        finally:
            self._merging.release()


def _named(message: str, names: dict[Path, str]) -> str:
    """A lorad.deltas message with server paths replaced by the adapter ids they hold."""
    for path, adapter_id in sorted(names.items(), key=lambda kv: -len(str(kv[0]))):
        message = message.replace(str(path), f"adapter {adapter_id!r}")
    return message
