"""What every lorad client puts on the wire besides the request: the routing key and the retry policy.

Routing key: each Generate / GenerateStream carries the adapter id twice, in the request body
(`adapter_id`, what the server serves) and as the gRPC metadata `x-lorad-adapter` (an HTTP/2
header), so that a load balancer can hash on it without parsing protobuf payloads: HAProxy
`balance hdr(x-lorad-adapter)`, Envoy `hash_policy: header`, nginx `hash $http_x_lorad_adapter`.
Requests for the base alone carry no key and are spread round-robin.

Retries: gRPC's own retry policy (a service config on the channel), for UNAVAILABLE only: the
server was loading, draining or gone, or a balancer had no replica for the call, so the request
never ran. Generation has no side effects, so a retry is safe; gRPC never retries a call once
the server has sent response headers or a message, so a stream that already yielded tokens is
not replayed.
"""

from __future__ import annotations

import json

ROUTING_HEADER = "x-lorad-adapter"
GENERATOR_SERVICE = "lorad.v1.Generator"
DEFAULT_RETRIES = 3  # attempts after the first; gRPC caps maxAttempts at 5


def routing_metadata(adapter_id: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata a Generate call sends: the routing key when the request names an adapter."""
    return ((ROUTING_HEADER, adapter_id),) if adapter_id else ()


def channel_options(retries: int = DEFAULT_RETRIES) -> list[tuple[str, object]]:
    """grpc channel options: retry UNAVAILABLE `retries` times with exponential backoff (0.2 s .. 2 s)."""
    if not 0 <= retries <= 4:
        raise ValueError(f"retries: {retries} is outside 0-4 (gRPC allows at most 5 attempts per call)")
    if retries == 0:
        return [("grpc.enable_retries", 0)]
    policy = {
        "maxAttempts": retries + 1,
        "initialBackoff": "0.2s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    config = {"methodConfig": [{"name": [{"service": GENERATOR_SERVICE}], "retryPolicy": policy}]}
    return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]
