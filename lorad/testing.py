"""Helpers for tests and benchmarks: tiny random Llama bases and random PEFT-format adapters.

Nothing here is used by the server itself.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lorad.geometry import ATTENTION_PROJECTIONS, PROJECTIONS, ModelGeometry


def write_random_adapter(
    path: str | Path,
    geometry: ModelGeometry,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] = PROJECTIONS,
    seed: int = 0,
    a_std: float | None = None,
    b_std: float = 0.02,
    layers: range | None = None,
    use_rslora: bool = False,
    base_model_name: str = "",
) -> Path:
    """Write an adapter exactly as PEFT's save_pretrained lays it out, with random A and B, through
    lorad's one adapter writer (lorad.deltas.adapter_io).

    Both A and B are nonzero (like PEFT's init_lora_weights=False), so the adapter changes the
    output; b_std keeps the change small enough that text stays fluent.
    """
    from lorad.deltas.adapter_io import PEFT_PREFIX, lora_config, write_adapter

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in layers if layers is not None else range(geometry.num_layers):
        for proj in targets:
            in_f, out_f = geometry.projection_shape(proj)
            group = "self_attn" if proj in ATTENTION_PROJECTIONS else "mlp"
            prefix = f"{PEFT_PREFIX}model.layers.{layer}.{group}.{proj}"
            std_a = a_std if a_std is not None else in_f**-0.5
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * std_a
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * b_std
    config = lora_config(rank=rank, alpha=alpha, target_modules=list(targets), base_model_name=base_model_name,
                         use_rslora=use_rslora)
    return write_adapter(path, tensors, config)


def tiny_llama(vocab_size: int, *, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4,
               kv_heads: int = 2, intermediate: int = 128, max_position_embeddings: int = 512):
    """A random-weight LlamaForCausalLM small enough for fast engine tests (float32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


def pace_steps(engine, seconds: float):
    """Make every engine step take at least `seconds` longer, so a request stays in flight on any machine (the tiny
    base makes hundreds of tokens a second on a quiet one). The wrapper runs on the model thread. Returns the undo."""
    step = engine._step

    def paced() -> None:
        time.sleep(seconds)
        step()

    engine._step = paced
    return lambda: setattr(engine, "_step", step)


class ServerThread:
    """A real lorad gRPC server on its own event loop thread, for tests and benchmarks.

        with ServerThread(config, base) as srv:
            Client(f"127.0.0.1:{srv.port}").generate(...)
    """

    def __init__(self, config, base=None):
        import asyncio
        import threading

        from lorad.server.app import LoradServer

        self._asyncio = asyncio
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="lorad-test-server", daemon=True)
        self.thread.start()
        self.server = LoradServer(config, base=base)
        self._start = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop)
        self.port = None

    def wait_started(self, timeout: float = 120.0) -> int:
        self.port = self._start.result(timeout)
        return self.port

    @property
    def engine(self):
        return self.server.engine

    def stop(self, grace: float = 1.0) -> None:
        self._asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def __enter__(self) -> "ServerThread":
        self.wait_started()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServeProcess:
    """`lorad serve` as a user runs it, in a subprocess on a free port:

        with ServeProcess(["--adapters", root]) as srv:
            Client(srv.target).generate(...)
    """

    def __init__(self, args: list[str], log_path, timeout: float = 300.0):
        import os
        import sys

        self.args = args
        self.log_path = Path(log_path)
        self.timeout = timeout
        self.lorad = str(Path(sys.executable).with_name("lorad"))
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.proc = None
        self.target = None
        self.http_url = None  # http://127.0.0.1:PORT/v1 when started with --http-port

    def start(self) -> "ServeProcess":
        import re
        import subprocess

        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(
                [self.lorad, "serve", "--port", "0", "--metrics-port", "-1", *self.args],
                stdout=out, stderr=subprocess.STDOUT, env=self.env,
            )
        deadline = time.time() + self.timeout
        while time.time() < deadline and self.proc.poll() is None:
            text = self.log_path.read_text()
            m = re.search(r"gRPC listening on [^\s]+:(\d+)", text)
            if m and " serving " in text:
                self.target = f"127.0.0.1:{m.group(1)}"
                http = re.search(r"HTTP API on (https?://[^\s]+/v1)", text)
                self.http_url = http.group(1) if http else None
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"lorad serve did not come up:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, timeout: float = 60.0) -> int | None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except Exception:
                self.proc.kill()
        return self.proc.returncode if self.proc is not None else None

    def __enter__(self) -> "ServeProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
