"""Plain result types and request building shared by the sync and async clients."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from lorad.v1 import lorad_pb2

FINISH_REASON_NAMES = {
    lorad_pb2.FINISH_REASON_LENGTH: "length",
    lorad_pb2.FINISH_REASON_EOS: "eos",
    lorad_pb2.FINISH_REASON_STOP: "stop",
    lorad_pb2.FINISH_REASON_CANCELLED: "cancelled",
}
LOCATION_NAMES = {
    lorad_pb2.ADAPTER_LOCATION_DISK: "disk",
    lorad_pb2.ADAPTER_LOCATION_HOST: "host",
    lorad_pb2.ADAPTER_LOCATION_DEVICE: "device",
}


class LoradRPCError(Exception):
    """A call failed; `code` is the grpc.StatusCode and `details` the server's sentence."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def wrap(cls, err: grpc.RpcError) -> "LoradRPCError":
        return cls(err.code(), err.details() or "")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # length | eos | stop | cancelled
    prompt_tokens: int
    completion_tokens: int
    token_logprobs: list[float] = field(default_factory=list)  # when asked for with logprobs=True

    @classmethod
    def from_proto(cls, msg: lorad_pb2.GenerateResponse) -> "Completion":
        return cls(
            text=msg.text,
            token_ids=list(msg.token_ids),
            finish_reason=FINISH_REASON_NAMES.get(msg.finish_reason, "unspecified"),
            prompt_tokens=msg.prompt_tokens,
            completion_tokens=msg.completion_tokens,
            token_logprobs=list(msg.token_logprobs),
        )


@dataclass
class Chunk:
    """A piece of a streamed completion."""

    text: str
    token_ids: list[int]
    token_logprobs: list[float] = field(default_factory=list)


@dataclass
class AdapterInfo:
    id: str
    rank: int
    target_modules: list[str]
    size_bytes: int
    location: str  # disk | host | device
    lora_alpha: float
    error: str = ""


@dataclass
class AdapterList:
    adapters: list[AdapterInfo] = field(default_factory=list)
    base_model: str = ""
    max_loras: int = 0
    max_lora_rank: int = 0

    @classmethod
    def from_proto(cls, msg: lorad_pb2.ListAdaptersResponse) -> "AdapterList":
        return cls(
            adapters=[
                AdapterInfo(a.id, a.rank, list(a.target_modules), a.size_bytes,
                            LOCATION_NAMES.get(a.location, "unknown"), a.lora_alpha, a.error)
                for a in msg.adapters
            ],
            base_model=msg.base_model,
            max_loras=msg.max_loras,
            max_lora_rank=msg.max_lora_rank,
        )


def build_request(
    prompt: str | None = None,
    *,
    messages: list[dict] | None = None,
    adapter_id: str | None = None,
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    repetition_penalty: float = 0.0,
    stop: list[str] | tuple[str, ...] = (),
    logprobs: bool = False,
) -> lorad_pb2.GenerateRequest:
    """0 / empty means 'server default' or 'off' for every numeric field (see lorad.proto)."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    # unsigned in the proto: say which field is wrong instead of protobuf's "Value out of range"
    for name, value in (("max_new_tokens", max_new_tokens), ("top_k", top_k), ("seed", seed)):
        if value is not None and not 0 <= value < 2 ** (64 if name == "seed" else 32):
            raise ValueError(f"{name}: {value} is out of range (0 or more{'' if name == 'seed' else ', < 2**32'})")
    request = lorad_pb2.GenerateRequest(
        prompt=prompt or "",
        messages=[lorad_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages or []],
        adapter_id=adapter_id or "",
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        stop=list(stop),
        logprobs=logprobs,
    )
    if seed is not None:
        request.seed = seed
    return request
