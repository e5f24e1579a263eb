"""The lorad.v1.AdapterManager service: translates RPCs to commands for the adapter manager
(lorad.server.adapter_manager, on the model thread) and to the publisher (files on disk).

Access control is not here: lorad.server.auth's interceptor admits only admin callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path

from lorad.adapter_format import inspect_adapter, load_adapter
from lorad.base_model import BaseModelConfig
from lorad.errors import AdapterNotFoundError, DeadlineExceededError, EngineStoppedError, InvalidRequestError, LoradError
from lorad.v1 import lorad_pb2, lorad_pb2_grpc

from lorad.server import adapter_publish, base_match
from lorad.server.adapter_manager import Delete, Load, Published, Undelete, Unload, Unpin
from lorad.server.adapter_publish import AdapterPublisher, DigestMemo, UploadLimits
from lorad.server.delta_jobs import DeltaJobs
from lorad.server.status import message_for, status_for

log = logging.getLogger(__name__)

LOCATIONS = {
    "disk": lorad_pb2.ADAPTER_LOCATION_DISK,
    "host": lorad_pb2.ADAPTER_LOCATION_HOST,
    "device": lorad_pb2.ADAPTER_LOCATION_DEVICE,
}
BASE_MATCH = {base_match.YES: lorad_pb2.BASE_MATCH_YES, base_match.NO: lorad_pb2.BASE_MATCH_NO,
              base_match.UNKNOWN: lorad_pb2.BASE_MATCH_UNKNOWN}


class AdapterManagerService(lorad_pb2_grpc.AdapterManagerServicer):
    def __init__(self, adapters_dir: str | None, limits: UploadLimits, base: BaseModelConfig | None = None,
                 export_dir: str | None = None):
        self.engine = None  # set once the base is loaded
        self.base_name = ""
        self.base = base or BaseModelConfig()
        self.export_dir = export_dir
        self.publisher = AdapterPublisher(adapters_dir, limits) if adapters_dir else None
        self.digests = DigestMemo()
        self._served: base_match.ServedBase | None = None
        self._delta_jobs: DeltaJobs | None = None

    def close(self) -> None:
        if self._delta_jobs is not None:
            self._delta_jobs.close()

    # --- helpers ----------------------------------------------------------------------------

    def _engine(self):
        if self.engine is None:
            raise EngineStoppedError("the server is still loading the base model; retry shortly")
        return self.engine

    def _publisher(self) -> AdapterPublisher:
        if self.publisher is None:
            raise InvalidRequestError("this server was started without --adapters; it has nowhere to keep adapters")
        return self.publisher

    def _jobs(self) -> DeltaJobs:
        if self._delta_jobs is None:
            engine = self._engine()
            self._delta_jobs = DeltaJobs(self._publisher(), engine.store.path_for, self.validate,
                                         engine.config.max_lora_rank, self.base, str(engine.device), self.export_dir)
        return self._delta_jobs

    def served_base(self) -> base_match.ServedBase:
        if self._served is None:
            from lorad.base_model import weights_digest

            base = self._engine().base
            self._served = base_match.ServedBase.from_loaded(base, weights_digest(base.resolved))
        return self._served

    def validate(self, adapter_id: str, path: Path) -> None:
        """Exactly what a folder adapter goes through before serving, plus the base check."""
        engine = self._engine()
        base_match.check(adapter_id, path, self.served_base())  # first: its sentence names both bases
        inspect_adapter(path, adapter_id, engine.geometry, engine.config.max_lora_rank)
        load_adapter(path, adapter_id, engine.geometry, engine.config.max_lora_rank)

    def _info(self, status) -> lorad_pb2.AdapterInfo:
        info = lorad_pb2.AdapterInfo(
            id=status.adapter_id, rank=status.rank, target_modules=list(status.target_modules),
            size_bytes=status.size_bytes, location=LOCATIONS[status.location], lora_alpha=status.lora_alpha,
            error=status.error, digest=status.digest, pinned=status.pinned, requests_running=status.requests_running,
            last_used_unix_seconds=status.last_used, old_versions_resident=status.old_versions,
            saved_modules=list(status.saved_modules),
        )
        root = self._publisher().root
        path = root / status.adapter_id
        try:
            info.digest = info.digest or self.digests.digest(path)
        except OSError:  # removed while listing
            return info
        trained = base_match.read_trained_for(path)
        verdict, why = base_match.match(trained, self.served_base())
        info.trained_for_base = trained.name
        info.base_match = BASE_MATCH[verdict]
        if verdict == base_match.NO and not info.error:
            info.error = f"adapter {status.adapter_id!r}: {why}"
        return info

    def _listing(self) -> lorad_pb2.ListAdaptersResponse:
        engine = self._engine()
        statuses = engine.list_adapters() if self.publisher is not None else []
        infos = [self._info(s) for s in statuses]
        by_digest: dict[str, list[str]] = {}
        for info in infos:
            if info.digest:
                by_digest.setdefault(info.digest, []).append(info.id)
        for info in infos:
            info.same_content_as.extend(i for i in by_digest.get(info.digest, ()) if i != info.id)
        return lorad_pb2.ListAdaptersResponse(
            adapters=infos, base_model=self.base_name, max_loras=engine.config.max_loras,
            max_lora_rank=engine.config.max_lora_rank, max_pinned=engine.config.max_loras - 1,
        )

    async def _fail(self, context, error: BaseException):
        if not isinstance(error, LoradError):
            log.error("unexpected error in an AdapterManager handler", exc_info=error)
        await context.abort(status_for(error), message_for(error))

    async def _command(self, command, context):
        """Post a command to the model thread and wait for its answer (within the call's deadline)."""
        engine = self._engine()
        self._publisher()._check_id(command.adapter_id)
        engine.post(command)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(command.done), timeout=context.time_remaining())
        except TimeoutError:  # the command goes on in the server (a drain, a load); only the wait ends
            raise DeadlineExceededError(
                f"{type(command).__name__.lower()} of adapter {command.adapter_id!r} did not finish within the "
                "call's deadline; it goes on in the server: call again with a longer deadline to wait for it"
            ) from None

    async def _get(self, adapter_id: str) -> lorad_pb2.AdapterInfo:
        listing = await asyncio.get_running_loop().run_in_executor(None, self._listing)
        for info in listing.adapters:
            if info.id == adapter_id:
                return info
        self._publisher()._check_id(adapter_id)
        raise AdapterNotFoundError(f"adapter {adapter_id!r} not found")

    async def listing(self) -> lorad_pb2.ListAdaptersResponse:
        return await asyncio.get_running_loop().run_in_executor(None, self._listing)

    # --- RPCs -------------------------------------------------------------------------------

    async def LoadAdapter(self, request, context):
        try:
            report = await self._command(Load(request.id, pin=request.pin), context)
            return lorad_pb2.LoadAdapterResponse(adapter=await self._get(request.id),
                                                 host_load_seconds=report.host_seconds,
                                                 device_load_seconds=report.device_seconds)
        except Exception as exc:
            await self._fail(context, exc)

    async def UnpinAdapter(self, request, context):
        try:
            await self._command(Unpin(request.id), context)
            return await self._get(request.id)
        except Exception as exc:
            await self._fail(context, exc)

    async def UnloadAdapter(self, request, context):
        try:
            report = await self._command(Unload(request.id), context)
            return lorad_pb2.UnloadAdapterResponse(
                adapter=await self._get(request.id), requests_drained=report.requests_drained, seconds=report.seconds,
                freed_host_bytes=report.freed_host_bytes, freed_slot=report.freed_slot)
        except Exception as exc:
            await self._fail(context, exc)

    async def DeleteAdapter(self, request, context):
        """New requests get NOT_FOUND at once; once the running ones are done (memory freed), the
        folder is renamed out of the adapters folder, then removed."""
        try:
            publisher = self._publisher()
            publisher.check_writable()  # before the engine lets go of it
            loop = asyncio.get_running_loop()
            try:
                report = await self._command(Delete(request.id), context)
                # the version deleted: the one in memory, else the files' (an adapter only on disk)
                digest = report.digest or await loop.run_in_executor(
                    None, self.digests.digest, publisher.root / request.id)
                trash = await loop.run_in_executor(None, publisher.retire, request.id)
            except BaseException:  # a deadline, a cancel, a failed rename: the folder stays, so it serves
                if (publisher.root / request.id).is_dir():
                    with contextlib.suppress(EngineStoppedError):  # stopped: nothing to undelete in
                        self._engine().post(Undelete(request.id))
                raise
            await loop.run_in_executor(None, publisher.purge, trash)
            return lorad_pb2.DeleteAdapterResponse(id=request.id, digest=digest,
                                                   requests_drained=report.requests_drained, seconds=report.seconds)
        except Exception as exc:
            await self._fail(context, exc)

    async def ListAdapters(self, request, context):
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self._listing)
        except Exception as exc:
            await self._fail(context, exc)

    async def GetAdapter(self, request, context):
        try:
            listing = await asyncio.get_running_loop().run_in_executor(None, self._listing)
            for info in listing.adapters:
                if info.id == request.id:
                    return info
            self._publisher()._check_id(request.id)
            raise AdapterNotFoundError(f"adapter {request.id!r} not found")
        except Exception as exc:
            await self._fail(context, exc)

    async def UploadAdapter(self, request_iterator, context):
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            publisher = self._publisher()
            self._engine()
            messages = request_iterator.__aiter__()
            first = await anext(messages, None)
            if first is None or not first.HasField("header"):
                raise InvalidRequestError("the first message of an upload must be its header (id, replace)")
            header = first.header
            # begin (mkdir, flock) and write (1 MiB, its sha256, an fsync per file) touch the disk:
            # on the event loop they would stall every other call this server is serving
            with await _begin_off_loop(publisher, header.id, header.replace, header.expected_digest) as upload:
                async for message in messages:
                    if not message.HasField("chunk"):
                        raise InvalidRequestError("only one header per upload; the rest must be file chunks")
                    await loop.run_in_executor(None, upload.write, message.chunk.name, message.chunk.data)
                published = await loop.run_in_executor(
                    None, upload.finish, lambda path: self.validate(header.id, path))
            info = await self._serve_published(published, "upload", context)
        except Exception as exc:
            await self._fail(context, exc)
            return
        log.info("upload of adapter %s: %d bytes in %.2f s", published.adapter_id, published.bytes_received,
                 time.perf_counter() - started)
        return lorad_pb2.UploadAdapterResponse(adapter=info, replaced=published.replaced,
                                               previous_digest=published.previous_digest,
                                               bytes_received=published.bytes_received)

    async def _serve_published(self, published: adapter_publish.Published, action: str,
                               context) -> lorad_pb2.AdapterInfo:
        """After a version was renamed into place: the model thread retires a replaced version (its
        running requests finish on it), the old files go, the counters count; returns its listing."""
        loop = asyncio.get_running_loop()
        await self._command(Published(published.adapter_id, digest=published.digest), context)
        await loop.run_in_executor(None, self._publisher().purge, published.previous_trash)
        observer = self._engine().observer
        observer.adapter_event(action)
        if published.replaced:
            observer.adapter_event("replace")
        listing = await loop.run_in_executor(None, self._listing)
        return next((i for i in listing.adapters if i.id == published.adapter_id),
                    lorad_pb2.AdapterInfo(id=published.adapter_id, digest=published.digest))

    async def _serve_orphan(self, work) -> None:
        """A combination whose caller left after the math: if it was published anyway, the model
        thread still learns of the new version."""
        try:
            done = await work
        except Exception:  # cancelled or failed: nothing was published
            return
        with contextlib.suppress(EngineStoppedError):  # a stopped engine has nothing to retire
            self._engine().post(Published(done.published.adapter_id, digest=done.published.digest))
        await asyncio.get_running_loop().run_in_executor(None, self._publisher().purge, done.published.previous_trash)

    async def CombineAdapters(self, request, context):
        """`lorad combine` on the server (lorad.server.delta_jobs), published like an upload."""
        from lorad.deltas.combine import CombineConfig

        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        try:
            jobs = self._jobs()
            defaults = CombineConfig()
            config = CombineConfig(method=request.method or defaults.method, rank=request.rank or None,
                                   density=request.density if request.HasField("density") else defaults.density,
                                   majority_sign_method=request.majority_sign_method or defaults.majority_sign_method,
                                   seed=request.seed)
            inputs = [(i.id, i.weight if i.HasField("weight") else 1.0) for i in request.inputs]
            work = loop.run_in_executor(jobs.combines, jobs.combine, inputs, config, request.output_id,
                                        request.replace, cancel)
            try:
                done = await asyncio.shield(work)
            except asyncio.CancelledError:  # the client went away: stop between modules
                cancel.set()
                asyncio.ensure_future(self._serve_orphan(work))
                raise
            info = await self._serve_published(done.published, "combine", context)
        except Exception as exc:
            await self._fail(context, exc)
            return
        result = done.result
        log.info("combined %s into adapter %s (%s, rank %d) in %.2f s", [i for i, _ in inputs],
                 request.output_id, config.method, done.rank, done.seconds)
        return lorad_pb2.CombineAdaptersResponse(
            adapter=info, replaced=done.published.replaced, previous_digest=done.published.previous_digest,
            overall_error=result.overall_error, max_module_error=result.max_error, rank=done.rank,
            seconds=done.seconds, warnings=result.warnings)

    async def MergeAdapter(self, request, context):
        """`lorad export` on the server, into --export-dir, on the merge worker thread."""
        started = time.perf_counter()
        try:
            jobs = self._jobs()
            # a caller that goes away leaves the merge running to its end (nothing half-written either way)
            report = await asyncio.shield(asyncio.wrap_future(jobs.submit_merge(
                request.id, request.format, request.output_name, request.dtype, request.outtype, request.overwrite)))
            self._engine().observer.adapter_event("merge")
        except Exception as exc:
            await self._fail(context, exc)
            return
        checks = report.checks or ([report.merge.verification] if report.merge and report.merge.verification else [])
        log.info("merged adapter %s into %s (%s)", request.id, report.path, report.format)
        return lorad_pb2.MergeAdapterResponse(
            path=str(report.path), format=report.format, bytes=report.bytes,
            verified=all(c.passed for c in checks) and bool(checks or report.adapter_errors),
            verification=[c.summary() for c in checks] + (
                [f"{len(report.adapter_errors)} module deltas read back; max relative error "
                 f"{max(report.adapter_errors.values()):.2e}"] if report.adapter_errors else []),
            max_logprob_error=max((c.max_logprob_diff for c in checks), default=0.0), seconds=time.perf_counter() - started)


async def _begin_off_loop(publisher: AdapterPublisher, adapter_id: str, replace: bool, expected_digest: str):
    """publisher.begin on a worker thread; a caller cancelled while it runs aborts the upload it
    makes (else its staging folder and upload slot would stay taken)."""
    began = asyncio.get_running_loop().run_in_executor(None, publisher.begin, adapter_id, replace, expected_digest)
    try:
        return await asyncio.shield(began)
    except asyncio.CancelledError:
        began.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or f.result().abort())
        raise
