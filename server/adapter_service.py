"""The lorad.v1.AdapterManager service: translates RPCs to the adapter publisher and the engine.

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

    def _info(self, status, all_statuses) -> lorad_pb2.AdapterInfo:
        info = lorad_pb2.AdapterInfo(
            id=status.adapter_id, rank=status.rank, target_modules=list(status.target_modules),
            size_bytes=status.size_bytes, location=LOCATIONS[status.location], lora_alpha=status.lora_alpha,
            error=status.error,
        )
        root = self._publisher().root
        path = root / status.adapter_id
        try:
            info.digest = self.digests.digest(path)
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
        infos = [self._info(s, statuses) for s in statuses]
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

    # --- RPCs -------------------------------------------------------------------------------

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
            if header.replace and publisher.exists(header.id):
                # versioned replace (requests admitted before it finish on the old version) needs the
                # engine's adapter manager, which this build does not have yet
                raise InvalidRequestError(f"adapter {header.id!r} exists; replacing a served adapter is not supported "
                                          "by this server yet: delete the folder or upload under a new id")
            with publisher.begin(header.id, header.replace, header.expected_digest) as upload:
                async for message in messages:
                    if not message.HasField("chunk"):
                        raise InvalidRequestError("only one header per upload; the rest must be file chunks")
                    upload.write(message.chunk.name, message.chunk.data)
                published = await loop.run_in_executor(
                    None, upload.finish, lambda path: self.validate(header.id, path))
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
