"""The lorad.v1.AdapterManager service: translates RPCs to commands for the adapter manager
(lorad.server.adapter_manager, on the model thread) and to the publisher (files on disk).

Access control is not here: lorad.server.auth's interceptor admits only admin callers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from lorad.adapter_format import inspect_adapter, load_adapter
from lorad.errors import AdapterNotFoundError, EngineStoppedError, InvalidRequestError, LoradError
from lorad.v1 import lorad_pb2, lorad_pb2_grpc

from lorad.server import base_match
from lorad.server.adapter_manager import Delete, Load, Published, Unload, Unpin
from lorad.server.adapter_publish import AdapterPublisher, DigestMemo, UploadLimits
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
    def __init__(self, adapters_dir: str | None, limits: UploadLimits):
        self.engine = None  # set once the base is loaded
        self.base_name = ""
        self.publisher = AdapterPublisher(adapters_dir, limits) if adapters_dir else None
        self.digests = DigestMemo()
        self._served: base_match.ServedBase | None = None

    # --- helpers ----------------------------------------------------------------------------

    def _engine(self):
        if self.engine is None:
            raise EngineStoppedError("the server is still loading the base model; retry shortly")
        return self.engine

    def _publisher(self) -> AdapterPublisher:
        if self.publisher is None:
            raise InvalidRequestError("this server was started without --adapters; it has nowhere to keep adapters")
        return self.publisher

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
        return await asyncio.wait_for(asyncio.wrap_future(command.done), timeout=context.time_remaining())

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
            report = await self._command(Delete(request.id), context)
            loop = asyncio.get_running_loop()
            # the version deleted: the one in memory, else the files' (an adapter only on disk)
            digest = report.digest or await loop.run_in_executor(None, self.digests.digest, publisher.root / request.id)
            trash = await loop.run_in_executor(None, publisher.retire, request.id)
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
            with publisher.begin(header.id, header.replace, header.expected_digest) as upload:
                async for message in messages:
                    if not message.HasField("chunk"):
                        raise InvalidRequestError("only one header per upload; the rest must be file chunks")
                    upload.write(message.chunk.name, message.chunk.data)
                published = await loop.run_in_executor(
                    None, upload.finish, lambda path: self.validate(header.id, path))
            # the model thread retires a replaced version (its running requests finish on it)
            await self._command(Published(header.id, digest=published.digest), context)
            await loop.run_in_executor(None, publisher.purge, published.previous_trash)
            observer = self._engine().observer
            observer.adapter_event("upload")
            if published.replaced:
                observer.adapter_event("replace")
            listing = await loop.run_in_executor(None, self._listing)
        except Exception as exc:
            await self._fail(context, exc)
            return
        log.info("upload of adapter %s: %d bytes in %.2f s", published.adapter_id, published.bytes_received,
                 time.perf_counter() - started)
        info = next((i for i in listing.adapters if i.id == published.adapter_id),
                    lorad_pb2.AdapterInfo(id=published.adapter_id, digest=published.digest))
        return lorad_pb2.UploadAdapterResponse(adapter=info, replaced=published.replaced,
                                               previous_digest=published.previous_digest,
                                               bytes_received=published.bytes_received)
