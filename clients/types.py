"""Plain result types and request building shared by the sync and async clients."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

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
BASE_MATCH_NAMES = {
    lorad_pb2.BASE_MATCH_UNKNOWN: "unknown",
    lorad_pb2.BASE_MATCH_YES: "yes",
    lorad_pb2.BASE_MATCH_NO: "no",
}
# What an upload sends from an adapter folder (the weights are required, the provenance optional).
UPLOAD_FILES = ("adapter_config.json", "adapter_model.safetensors", "lorad_provenance.json")
UPLOAD_CHUNK_BYTES = 1 << 20  # well under gRPC's 4 MiB message limit


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
    adapter_version: str = ""  # digest of the adapter version that answered; "" for the base

    @classmethod
    def from_proto(cls, msg: lorad_pb2.GenerateResponse) -> "Completion":
        return cls(
            text=msg.text,
            token_ids=list(msg.token_ids),
            finish_reason=FINISH_REASON_NAMES.get(msg.finish_reason, "unspecified"),
            prompt_tokens=msg.prompt_tokens,
            completion_tokens=msg.completion_tokens,
            token_logprobs=list(msg.token_logprobs),
            adapter_version=msg.adapter_version,
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
    digest: str = ""  # "sha256:..." of the current version's files
    pinned: bool = False
    requests_running: int = 0
    last_used_unix_seconds: float = 0.0  # 0 = not used since the server started
    trained_for_base: str = ""
    base_match: str = "unknown"  # yes | no | unknown
    same_content_as: list[str] = field(default_factory=list)
    old_versions_resident: int = 0
    saved_modules: list[str] = field(default_factory=list)  # modules_to_save it replaces (lm_head, embed_tokens)

    @classmethod
    def from_proto(cls, a: lorad_pb2.AdapterInfo) -> "AdapterInfo":
        return cls(a.id, a.rank, list(a.target_modules), a.size_bytes, LOCATION_NAMES.get(a.location, "unknown"),
                   a.lora_alpha, a.error, a.digest, a.pinned, a.requests_running, a.last_used_unix_seconds,
                   a.trained_for_base, BASE_MATCH_NAMES.get(a.base_match, "unknown"), list(a.same_content_as),
                   a.old_versions_resident, list(a.saved_modules))


@dataclass
class AdapterList:
    adapters: list[AdapterInfo] = field(default_factory=list)
    base_model: str = ""
    max_loras: int = 0
    max_lora_rank: int = 0
    max_pinned: int = 0

    @classmethod
    def from_proto(cls, msg: lorad_pb2.ListAdaptersResponse) -> "AdapterList":
        return cls(
            adapters=[AdapterInfo.from_proto(a) for a in msg.adapters],
            base_model=msg.base_model,
            max_loras=msg.max_loras,
            max_lora_rank=msg.max_lora_rank,
            max_pinned=msg.max_pinned,
        )


@dataclass
class LoadResult:
    adapter: AdapterInfo
    host_load_seconds: float  # disk -> host memory (0 if it was there already)
    device_load_seconds: float  # host -> device slot (0 if it was there already)


@dataclass
class UnloadResult:
    adapter: AdapterInfo
    requests_drained: int
    seconds: float
    freed_host_bytes: int
    freed_slot: bool


@dataclass
class DeleteResult:
    id: str
    digest: str
    requests_drained: int
    seconds: float


@dataclass
class UploadResult:
    adapter: AdapterInfo
    replaced: bool
    previous_digest: str
    bytes_received: int


@dataclass
class CombineResult:
    adapter: AdapterInfo
    replaced: bool
    previous_digest: str
    overall_error: float  # relative Frobenius error of the factoring, all modules
    max_module_error: float
    rank: int
    seconds: float
    warnings: list[str]

    @classmethod
    def from_proto(cls, r) -> "CombineResult":
        return cls(AdapterInfo.from_proto(r.adapter), r.replaced, r.previous_digest, r.overall_error,
                   r.max_module_error, r.rank, r.seconds, list(r.warnings))


@dataclass
class MergeResult:
    path: str  # on the server, under its --export-dir
    format: str
    bytes: int
    verified: bool
    verification: list[str]  # one sentence per check
    max_logprob_error: float
    seconds: float

    @classmethod
    def from_proto(cls, r) -> "MergeResult":
        return cls(r.path, r.format, r.bytes, r.verified, list(r.verification), r.max_logprob_error, r.seconds)


def combine_request(inputs, output_id: str, *, method: str = "", rank: int | None = None,
                    density: float | None = None, majority_sign_method: str = "", seed: int = 0,
                    replace: bool = False) -> lorad_pb2.CombineAdaptersRequest:
    """inputs: adapter ids, or (id, weight) pairs (weight 1 for a bare id)."""
    pairs = [(i, None) if isinstance(i, str) else (i[0], float(i[1])) for i in inputs]
    request = lorad_pb2.CombineAdaptersRequest(
        inputs=[lorad_pb2.WeightedAdapter(id=i, weight=w) if w is not None else lorad_pb2.WeightedAdapter(id=i)
                for i, w in pairs],
        method=method, rank=rank or 0, majority_sign_method=majority_sign_method, seed=seed, output_id=output_id,
        replace=replace)
    if density is not None:
        request.density = density
    return request


def upload_messages(folder: str | Path, adapter_id: str, replace: bool = False,
                    chunk_bytes: int = UPLOAD_CHUNK_BYTES) -> Iterator[lorad_pb2.UploadAdapterRequest]:
    """The UploadAdapter stream for an adapter folder: the header, then each file in chunks.
    A folder without the two required files raises ValueError here, before anything is sent."""
    folder = Path(folder)
    if not (folder / "adapter_model.safetensors").is_file():
        pickled = [n for n in ("adapter_model.bin", "adapter_model.pt") if (folder / n).is_file()]
        hint = (f" (it has {pickled[0]}: re-save it with PEFT's save_pretrained, which writes safetensors)"
                if pickled else "")
        raise ValueError(f"{folder} has no adapter_model.safetensors{hint}")
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(f"{folder} has no adapter_config.json")
    return _upload_stream(folder, adapter_id, replace, chunk_bytes)


def _upload_stream(folder: Path, adapter_id: str, replace: bool, chunk_bytes: int):
    yield lorad_pb2.UploadAdapterRequest(header=lorad_pb2.UploadHeader(id=adapter_id, replace=replace))
    for name in UPLOAD_FILES:
        path = folder / name
        if not path.is_file():
            continue
        with open(path, "rb") as f:
            while True:
                data = f.read(chunk_bytes)
                yield lorad_pb2.UploadAdapterRequest(chunk=lorad_pb2.FileChunk(name=name, data=data))
                if len(data) < chunk_bytes:
                    break


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def channel_credentials(tls_ca: str | None, client_cert: str | None = None,
                        client_key: str | None = None) -> grpc.ChannelCredentials:
    """TLS credentials: tls_ca verifies the server (None = the system's roots); client_cert and
    client_key are for servers that require client certificates (mTLS)."""
    def read(path):
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(root_certificates=read(tls_ca), private_key=read(client_key),
                                        certificate_chain=read(client_cert))


def resolve_token(token: str | None) -> str | None:
    """An explicit token, else $LORAD_TOKEN, else none."""
    return token if token is not None else (os.environ.get("LORAD_TOKEN") or None)


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
