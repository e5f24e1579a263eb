"""Python clients for a lorad server.

    from lorad.clients import Client
    with Client("127.0.0.1:50051") as client:
        print(client.generate("What is LoRA?", adapter_id="my-adapter", max_new_tokens=64).text)
        for piece in client.stream(messages=[{"role": "user", "content": "Hi"}]):
            ...

AsyncClient has the same methods for asyncio. Both send the adapter id also as the gRPC metadata
`x-lorad-adapter` (ROUTING_HEADER), the key a load balancer hashes on (lorad.clients.channel).
"""

from lorad.clients.aio_client import AsyncClient
from lorad.clients.channel import ROUTING_HEADER
from lorad.clients.sync_client import Client
from lorad.clients.types import AdapterInfo, AdapterList, Chunk, Completion, LoradRPCError

__all__ = ["AdapterInfo", "AdapterList", "AsyncClient", "Chunk", "Client", "Completion", "LoradRPCError",
           "ROUTING_HEADER"]
