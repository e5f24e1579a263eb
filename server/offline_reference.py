"""lorad serving an adapter, offline: the reference a merged or exported model is checked against.

`lorad merge` / `lorad export` (lorad.deltas.merge) hand this function the base they merge into,
loaded in float32 with exactly the weights the merge starts from, and the adapter; it runs the
real Engine (the same packed forward, LoRA slots and sampling as `lorad serve`) with greedy
decoding and returns each prompt's tokens and log-probabilities.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

from lorad.base_model import LoadedBase
from lorad.deltas.verify import Generation
from lorad.server.config import EngineConfig
from lorad.server.engine import Engine
from lorad.server.sampling import SamplingParams

_ADAPTER_ID = "reference"


def engine_reference(base: LoadedBase, adapter_dir: Path | None, prompts: list[list[int]],
                     max_new_tokens: int, threads: int | None = None) -> list[Generation]:
    """Greedy answers of the engine serving `adapter_dir` (None: the base alone), all prompts in one batch.
    threads: torch threads of its model thread (None: EngineConfig's default, all cores but one)."""
    from lorad.deltas.adapter_io import read_adapter

    max_rank = max(read_adapter(adapter_dir).ranks) if adapter_dir is not None else 1
    longest = max(len(p) for p in prompts) + max_new_tokens + 1
    root = Path(tempfile.mkdtemp(prefix=".lorad-reference-"))
    try:
        if adapter_dir is not None:  # the engine serves adapters from a folder of folders
            shutil.copytree(adapter_dir, root / _ADAPTER_ID)
        config = EngineConfig(max_loras=1, max_cpu_loras=1, max_lora_rank=max_rank, max_batch_size=len(prompts),
                              max_seq_len=longest, kv_cache_memory=_kv_bytes(base, len(prompts), longest),
                              threads=threads)
        engine = Engine(base, config, adapters_dir=str(root))
        results: list = [None] * len(prompts)
        done = threading.Semaphore(0)

        def sink_for(i):
            def sink(event):
                if event.kind != "chunk":
                    results[i] = event
                    done.release()
            return sink

        params = SamplingParams(max_new_tokens=max_new_tokens, logprobs=True)
        adapter_id = _ADAPTER_ID if adapter_dir is not None else None
        with engine:
            for i, ids in enumerate(prompts):
                engine.submit(ids, params, sink_for(i), adapter_id=adapter_id)
            for _ in prompts:
                done.acquire()
        errors = [r.error for r in results if r.kind != "final"]
        if errors:
            raise errors[0]
        stops = tuple(sorted(engine.eos_ids))
        return [Generation(prompt=list(ids), tokens=list(r.token_ids), logprobs=list(r.logprobs),
                           stop_ids=stops if r.finish_reason == "eos" else ()) for ids, r in zip(prompts, results)]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _kv_bytes(base: LoadedBase, rows: int, seq_len: int) -> int:
    from lorad.geometry import ModelGeometry

    geometry = ModelGeometry.from_hf_config(base.model.config)
    return rows * seq_len * geometry.kv_bytes_per_token(4) + 2**20
