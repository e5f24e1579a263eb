"""Typed configuration of the engine and the server (gRPC, the HTTP API). CLI defaults come from here."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from lorad.base_model import BaseModelConfig
from lorad.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20,
          "G": 1e9, "GB": 1e9, "GIB": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40}


def parse_bytes(text: str | int, field_name: str) -> int:
    """'2GiB', '512MB', '1000000' -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").upper() if m else None
    if m is None or unit not in _UNITS:
        raise ConfigError(f"{field_name}: {text!r} is not a size such as 512MiB, 2GiB or 1000000")
    return int(float(m.group(1)) * _UNITS[unit])


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}: must be a positive integer, got {value!r}")


# EngineConfig.max_cpu_lora_memory's default: this share of the memory the process may use
HOST_CACHE_SHARE = 0.25
# EngineConfig.saved_modules_memory's default, in [vocab, hidden] copies of the base: two adapters
# that each replace lm_head and embed_tokens, or four that replace one of them, at once
SAVED_COPIES_BY_DEFAULT = 4
# lorad.kernels.BACKENDS, named here so that the CLI need not import torch (tests/test_serve_cli.py
# checks that they agree)
LORA_BACKENDS = ("auto", "torch", "triton", "cpu")


@dataclass
class EngineConfig:
    """How the engine batches, caches and bounds work.

    max_loras: adapter slots preallocated on the device; adapters in slots batch together.
    max_cpu_loras: adapters kept validated in host memory (LRU), ready to copy into a slot.
    max_cpu_lora_memory: bytes those adapters may take together; None = a quarter of the memory
        this process may use (lorad.cpu_features.host_memory_bytes; no byte bound where that
        cannot be read). Past either limit the least recently used are dropped; the adapter just
        read always stays, whatever its size.
    max_lora_rank: the largest adapter rank accepted; every slot is sized for it.
    max_batch_size: requests running at once (each holds one KV-cache row).
    max_seq_len: prompt + generated tokens per request; None = the base's limit, capped at 2048.
    kv_cache_memory: bytes for the KV cache, preallocated at start; None = exactly what
        max_batch_size sequences of max_seq_len tokens take for this base. When set,
        max_batch_size is lowered to what fits (an error if not even one sequence fits).
    max_prefill_tokens: prompt tokens processed per step; longer prompts are prefilled in chunks
        so running requests keep decoding.
    max_queue: requests waiting for a batch slot; one more is refused with RESOURCE_EXHAUSTED.
    default_max_new_tokens / max_new_tokens_limit: when a request says 0 / the most it may ask.
    threads: torch (OpenMP) threads of the model thread; None = lorad.cpu_features.default_threads().
    dequant_memory: bytes an NF4 base may spend on dequantized fp32 copies of its projections
        where bitsandbytes would dequantize them on every call (CPUs without AVX512-BF16);
        projections past the budget use lorad's NF4 kernel (below) at every batch size, or
        bitsandbytes' per-call path where the kernel cannot run. 0 disables the copies.
    nf4_kernel_rows: on those CPUs (AVX2 and FMA), batches of at most this many rows run NF4
        projections through lorad's NF4 kernel on the packed 4-bit weights
        (lorad.kernels.nf4_avx2), larger ones through the copies; projections past the copies'
        budget use the kernel at every batch size. 0 never uses the kernel.
    saved_modules_memory: device bytes for the whole weights modules_to_save adapters bring
        (lm_head / embed_tokens copies, [vocab, hidden] each) while they hold slots; None = room
        for SAVED_COPIES_BY_DEFAULT such copies of this base. Idle adapters' copies are evicted
        to make room; while running requests hold the rest, a request waits as for a busy slot;
        an adapter whose copies need more than the budget, or than pinned adapters' copies leave
        of it, is refused (FAILED_PRECONDITION). 0 serves no modules_to_save adapter.
    """

    max_loras: int = 8
    max_cpu_loras: int = 32
    max_lora_rank: int = 64
    max_batch_size: int = 32
    max_seq_len: int | None = None
    kv_cache_memory: int | None = None
    max_prefill_tokens: int = 1024
    max_queue: int = 256
    default_max_new_tokens: int = 128
    max_new_tokens_limit: int = 4096
    lora_backend: str = "auto"
    threads: int | None = None
    dequant_memory: int = 4 * 2**30
    nf4_kernel_rows: int = 32
    saved_modules_memory: int | None = None
    max_cpu_lora_memory: int | None = None

    def __post_init__(self) -> None:
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_bytes(self.kv_cache_memory, "kv_cache_memory")
        if self.max_cpu_lora_memory is not None:
            self.max_cpu_lora_memory = parse_bytes(self.max_cpu_lora_memory, "max_cpu_lora_memory")
            _positive("max_cpu_lora_memory", self.max_cpu_lora_memory)
        if self.saved_modules_memory is not None:
            self.saved_modules_memory = parse_bytes(self.saved_modules_memory, "saved_modules_memory")
            if self.saved_modules_memory < 0:
                raise ConfigError(f"saved_modules_memory: must not be negative, got {self.saved_modules_memory}")
        self.dequant_memory = parse_bytes(self.dequant_memory, "dequant_memory")
        if self.dequant_memory < 0:
            raise ConfigError(f"dequant_memory: must not be negative, got {self.dequant_memory}")
        rows = self.nf4_kernel_rows
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise ConfigError(f"nf4_kernel_rows: must be a whole number >= 0, got {self.nf4_kernel_rows!r}")
        for name in ("max_loras", "max_cpu_loras", "max_lora_rank", "max_batch_size", "max_prefill_tokens",
                     "max_queue", "default_max_new_tokens", "max_new_tokens_limit"):
            _positive(name, getattr(self, name))
        for name in ("max_seq_len", "kv_cache_memory", "threads"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.max_cpu_loras < self.max_loras:
            raise ConfigError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras}): "
                "every adapter in a device slot passes through the host cache"
            )
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ConfigError("default_max_new_tokens must not exceed max_new_tokens_limit")
        if self.lora_backend not in LORA_BACKENDS:
            raise ConfigError(f"lora_backend: {self.lora_backend!r} is not one of {', '.join(LORA_BACKENDS)}")


@dataclass
class ServerConfig:
    """The gRPC server around the engine.

    admin_token_file: a file holding the bearer token that AdapterManager calls need; without
        it, adapter management is open on a loopback-only server and refused on any other.
    api_token_file: a file holding the token Generator calls need (off: Generator is open).
    tls_cert / tls_key: PEM files; serve TLS instead of plaintext. tls_client_ca: also require
        client certificates signed by this CA (mTLS).
    max_upload_bytes: the most one UploadAdapter may send (all files together).
    export_dir: the folder MergeAdapter writes merged models into (None: MergeAdapter is off);
        a client names an output inside it, never a path.
    http_port: the OpenAI-compatible HTTP API (lorad.server.openai_api) on this port, beside gRPC,
        on the same engine; None = off (the default), 0 = any free port. http_host: None = host.
        Its bodies are limited to max_request_bytes and its tokens are api_token_file's.
    http_max_concurrency: HTTP generation requests in the server at once; one more gets 429.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = 9400  # None disables the Prometheus endpoint
    metrics_host: str | None = None  # None = same as host
    adapters_dir: str | None = None
    grace_seconds: float = 10.0
    # the largest request message accepted; bigger ones get RESOURCE_EXHAUSTED from grpc
    max_request_bytes: int = 4 * 2**20
    # chunks a streaming client may leave unread before its request is cancelled (RESOURCE_EXHAUSTED)
    max_unsent_chunks: int = 256
    # on shutdown: seconds to stay up, not ready but still serving, before refusing new calls, so
    # balancers (HAProxy health checks, Kubernetes endpoints) stop routing here first
    drain_seconds: float = 0.0
    metrics_adapter_ids: bool = False  # export which adapters are resident / running, by id
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    admin_token_file: str | None = None
    api_token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    max_upload_bytes: int = 2 * 2**30
    export_dir: str | None = None
    http_port: int | None = None
    http_host: str | None = None
    http_max_concurrency: int = 1024

    def __post_init__(self) -> None:
        if not (0 <= self.port <= 65535):
            raise ConfigError(f"port: {self.port} is outside 0-65535")
        if self.metrics_port is not None and not (0 <= self.metrics_port <= 65535):
            raise ConfigError(f"metrics_port: {self.metrics_port} is outside 0-65535")
        if self.http_port is not None and not (0 <= self.http_port <= 65535):
            raise ConfigError(f"http_port: {self.http_port} is outside 0-65535 (leave it out to turn HTTP off)")
        _positive("http_max_concurrency", self.http_max_concurrency)
        for name in ("grace_seconds", "drain_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative")
        self.max_request_bytes = parse_bytes(self.max_request_bytes, "max_request_bytes")
        for name in ("max_request_bytes", "max_unsent_chunks"):
            _positive(name, getattr(self, name))
        if self.max_request_bytes < 2**20 + 2**16:
            raise ConfigError(f"max_request_bytes: {self.max_request_bytes} is below 1 MiB + 64 KiB, "
                              "the size of one upload chunk message")
        self.max_upload_bytes = parse_bytes(self.max_upload_bytes, "max_upload_bytes")
        _positive("max_upload_bytes", self.max_upload_bytes)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key: give both (a certificate and its private key) or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca: needs tls_cert and tls_key (mTLS runs over TLS)")
        for name in ("admin_token_file", "api_token_file", "tls_cert", "tls_key", "tls_client_ca"):
            value = getattr(self, name)
            if value is not None and not os.path.isfile(value):
                raise ConfigError(f"{name}: {value} is not a file")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
