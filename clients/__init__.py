"""Python clients for a lorad server.

    from lorad.clients import Client
    with Client("127.0.0.1:50051") as client:
        print(client.generate("What is LoRA?", adapter_id="my-adapter", max_new_tokens=64).text)
        for piece in client.stream(messages=[{"role": "user", "content": "Hi"}]):
            ...

AsyncClient has the same methods for asyncio. Adapter management (admin):
load_adapter(id, pin=...), unpin_adapter, unload_adapter, delete_adapter,
upload_adapter(folder, id, replace=...), get_adapter; pass token=... (or set LORAD_TOKEN) and
tls_ca=... for a server with tokens and TLS. Both clients send the adapter id also as the gRPC
metadata `x-lorad-adapter` (ROUTING_HEADER), the key a load balancer hashes on (lorad.clients.channel).
"""

from lorad.clients.aio_client import AsyncClient
from lorad.clients.channel import ROUTING_HEADER
from lorad.clients.sync_client import Client
from lorad.clients.types import (
    AdapterInfo,
    AdapterList,
    Chunk,
    CombineResult,
    Completion,
    DeleteResult,
    LoadResult,
    LoradRPCError,
    MergeResult,
    UnloadResult,
    UploadResult,
)

__all__ = ["AdapterInfo", "AdapterList", "AsyncClient", "Chunk", "Client", "CombineResult", "Completion", "DeleteResult",
           "LoadResult", "LoradRPCError", "MergeResult", "ROUTING_HEADER", "UnloadResult", "UploadResult"]
