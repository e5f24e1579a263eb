"""Adapter variants `lorad train` makes, served: PEFT's `bias` ("all", "lora_only") on a Llama base
is a plain LoRA (Llama projections have no biases to train), so the server accepts it and
serves exactly what PEFT computes. DoRA and rsLoRA are in tests/test_oracle.py and
tests/test_dora_serving.py; lora_bias and modules_to_save stay refused."""

from __future__ import annotations

import copy

import pytest
import torch

from lorad.adapter_format import load_adapter
from lorad.errors import InvalidAdapterError


def _peft_adapter(model, path, **extra):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                           target_modules=["q_proj", "down_proj"], **extra))
    peft.save_pretrained(path)
    return peft


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_adapter_on_llama_is_served_as_peft_computes_it(tiny_base, tiny_geometry, tmp_path, bias):
    from test_dora_serving import runner_for

    from lorad.kernels import build_lora_meta
    from lorad.server.model_runner import SeqChunk, StepBatch

    peft = _peft_adapter(tiny_base.model, tmp_path / "a", bias=bias)
    adapter = load_adapter(tmp_path / "a", "a", tiny_geometry, max_rank=8)
    assert set(adapter.weights) == {(layer, p) for layer in (0, 1) for p in ("q_proj", "down_proj")}
    runner, pool = runner_for(tiny_base.model, tiny_geometry)
    slot = pool.acquire_load(adapter)
    ids = torch.tensor([5, 17, 99, 3, 42, 7])
    T = len(ids)
    batch = StepBatch(
        input_ids=ids, positions=torch.arange(T), rows=torch.zeros(T, dtype=torch.int64),
        chunks=[SeqChunk(row=0, start=0, length=T, offset=0)],
        lora_meta=build_lora_meta(torch.full((T,), slot, dtype=torch.int64), pool.num_slots),
        active_slots_mask=1 << slot, lora_rank=4, logits_index=torch.tensor([T - 1]), n_rows=1)
    got = runner.forward(batch)[0]  # [V]
    with torch.no_grad():
        expected = peft(ids[None]).logits[0, -1].float()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_lora_bias_adapter_is_still_refused(tiny_base, tiny_geometry, tmp_path):
    _peft_adapter(tiny_base.model, tmp_path / "b", lora_bias=True)
    with pytest.raises(InvalidAdapterError, match="does not map"):
        load_adapter(tmp_path / "b", "b", tiny_geometry, max_rank=8)
