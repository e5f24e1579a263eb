"""Helpers shared by the tests of served adapter variants (tests/test_variant_serving.py for
lora_bias, tests/test_saved_module_serving.py for modules_to_save): edit a saved PEFT adapter,
prefill several prompts in one runner step, and run prompts through the engine side by side
against PEFT's greedy tokens."""

from __future__ import annotations

import json
import shutil
import threading

import torch


def edit_adapter(src, dst, config: dict | None = None, tensors=None) -> None:
    """Copy adapter folder src to dst, update its adapter_config.json with `config` and pass its
    tensors (name -> tensor) to `tensors` to edit in place."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config:
        raw = json.loads((dst / "adapter_config.json").read_text())
        raw.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(raw))
    if tensors:
        weights = load_file(dst / "adapter_model.safetensors")
        tensors(weights)
        save_file(weights, dst / "adapter_model.safetensors")


def prefill_last_logits(runner, pool, prompts, token_slots_per_row) -> torch.Tensor:
    """One runner step prefilling every prompt at once, prompt i in cache row i with its tokens
    on slot token_slots_per_row[i] (-1: base). Returns each prompt's last-token logits [rows, V]."""
    from lorad.kernels import build_lora_meta
    from lorad.server.model_runner import SeqChunk, StepBatch

    chunks, offset = [], 0
    for row, ids in enumerate(prompts):
        chunks.append(SeqChunk(row=row, start=0, length=len(ids), offset=offset))
        offset += len(ids)
    slots = torch.cat([torch.full((len(ids),), s, dtype=torch.int64) for ids, s in zip(prompts, token_slots_per_row)])
    batch = StepBatch(
        input_ids=torch.tensor([t for ids in prompts for t in ids]),
        positions=torch.cat([torch.arange(len(i)) for i in prompts]),
        rows=torch.cat([torch.full((len(ids),), r, dtype=torch.int64) for r, ids in enumerate(prompts)]),
        chunks=chunks, lora_meta=build_lora_meta(slots, pool.num_slots),
        active_slots_mask=sum(1 << s for s in set(token_slots_per_row) if s >= 0), lora_rank=4,
        logits_index=torch.tensor([c.offset + c.length - 1 for c in chunks]), n_rows=len(prompts))
    return runner.forward(batch)


def greedy(model, ids, new_tokens: int) -> list[int]:
    """A transformers (or PEFT) model's greedy continuation of ids, one full forward per token."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-new_tokens:]


def engine_greedy_tokens(base, adapters_dir, prompts, adapters, new_tokens: int) -> list[list[int]]:
    """Submit every prompt at once (prompt i on adapters[i], None: base) to an engine on `base`
    serving adapters_dir, and return each one's generated tokens. The adapters are made
    resident first, so that every row joins the same batches."""
    from serving_helpers import make_engine

    engine = make_engine(base, str(adapters_dir))
    try:
        return _greedy_side_by_side(engine, prompts, adapters, new_tokens)
    finally:
        engine.stop()


def _greedy_side_by_side(engine, prompts, adapters, new_tokens: int) -> list[list[int]]:
    from lorad.server.sampling import SamplingParams

    for a in dict.fromkeys(a for a in adapters if a is not None):  # in order: the same slots every run
        engine.generate(prompts[0], SamplingParams(max_new_tokens=1), adapter_id=a)
    results, done = [], threading.Semaphore(0)
    for ids, a in zip(prompts, adapters):
        box = []
        results.append(box)
        engine.submit(ids, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
                      lambda e, box=box: (box.append(e), done.release()) if e.kind != "chunk" else None, adapter_id=a)
    for _ in adapters:
        assert done.acquire(timeout=120), "a request did not finish"
    assert all(box[0].kind == "final" for box in results), [box[0].error for box in results]
    return [box[0].token_ids for box in results]


def runner_with_adapters(model, geometry, root, adapter_ids, rows: int, num_slots: int | None = None,
                         max_rank: int = 8):
    """A float32 LlamaRunner on the CPU (the PyTorch twin) over `model`, with a KV cache of `rows`
    rows and a slot pool holding root / id for each id, loaded in order. Returns (runner, pool,
    {id: slot})."""
    from lorad.adapter_format import load_adapter
    from lorad.server.kv_cache import KVCache
    from lorad.server.lora_slots import LoRASlotPool
    from lorad.server.model_runner import LlamaRunner

    cpu = torch.device("cpu")
    kv = KVCache(geometry, rows, 16, torch.float32, cpu)
    pool = LoRASlotPool(geometry, num_slots=num_slots or len(adapter_ids), max_rank=max_rank, dtype=torch.float32,
                        device=cpu)
    runner = LlamaRunner(model, geometry, kv, pool, "torch")
    slots = {a: pool.acquire_load(load_adapter(root / a, a, geometry, max_rank=max_rank)) for a in adapter_ids}
    return runner, pool, slots
