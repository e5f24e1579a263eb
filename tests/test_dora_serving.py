"""DoRA in the engine's slots: the row scale the runner computes without a dequantized copy of the
base (||W||^2 per row once, W A^T through the served projection) equals kernels/dora.py's
dora_row_scale on the full weight; loading a DoRA adapter fills its slot's row scale and
evicting it restores ones. The end-to-end check, DoRA rows in a mixed batch against PEFT, is
tests/test_oracle.py."""

from __future__ import annotations

import copy

import pytest
import torch

from lorad.kernels.dora import dora_row_scale
from lorad.server.kv_cache import KVCache
from lorad.server.lora_slots import LoRASlotPool
from lorad.server.model_runner import LlamaRunner


def quantized_copy(model):
    """The tiny Llama with every projection in NF4 (double quant), as lorad serves a base."""
    import bitsandbytes as bnb

    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and name.endswith("_proj"):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.float32,
                                      quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True).to("cpu")
                setattr(module, name, q.eval())
    return model


def runner_for(model, geometry):
    kv = KVCache(geometry, 1, 16, torch.float32, torch.device("cpu"))
    pool = LoRASlotPool(geometry, num_slots=2, max_rank=8, dtype=torch.float32, device=torch.device("cpu"))
    return LlamaRunner(model, geometry, kv, pool, "torch"), pool


@pytest.mark.parametrize("quantized", [False, True])
def test_runner_row_scale_equals_the_kernels_reference(tiny_base, tiny_geometry, quantized):
    import bitsandbytes.functional as bnbf

    model = quantized_copy(tiny_base.model) if quantized else tiny_base.model
    weights = {}  # the served weight, read before the runner may repack it for the fused CPU kernel
    for proj in ("q_proj", "down_proj"):
        group = "self_attn" if proj == "q_proj" else "mlp"
        w = getattr(getattr(model.model.layers[1], group), proj).weight
        weights[proj] = bnbf.dequantize_4bit(w.data, w.quant_state).float() if quantized else w.float()
    runner, _ = runner_for(model, tiny_geometry)
    gen = torch.Generator().manual_seed(0)
    for proj, w in weights.items():
        out_f, in_f = w.shape
        a = torch.randn(6, in_f, generator=gen) * in_f**-0.5
        b = torch.randn(out_f, 6, generator=gen) * 0.3
        m = w.norm(dim=1) * (1 + 0.1 * torch.randn(out_f, generator=gen))
        got = runner.dora_row_scale(1, proj, a, b, 1.5, m)
        expected = dora_row_scale(w, a, b, 1.5, m)
        assert (expected - 1).abs().max() > 0.01  # a scale that matters
        # the fused NF4 kernel reads A in bf16 for the W A^T term: a 1e-3 relative budget covers it
        torch.testing.assert_close(got, expected, rtol=1e-3 if quantized else 1e-5, atol=1e-6)


def test_dora_slot_fills_and_clears(tiny_base, tiny_geometry, tmp_path):
    from peft import LoraConfig, get_peft_model

    from lorad.adapter_format import load_adapter

    model = copy.deepcopy(tiny_base.model)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                            target_modules=["v_proj"]))
    with torch.no_grad():
        for module in peft.modules():
            if "default" in getattr(module, "lora_magnitude_vector", {}):
                module.lora_magnitude_vector["default"].weight.mul_(1.2)
    peft.save_pretrained(tmp_path / "dora")
    adapter = load_adapter(tmp_path / "dora", "dora", tiny_geometry, max_rank=8)
    assert adapter.spec.use_dora and set(adapter.magnitudes) == {(0, "v_proj"), (1, "v_proj")}
    runner, pool = runner_for(tiny_base.model, tiny_geometry)
    slot = pool.acquire_load(adapter)
    v, q = pool.layers[0]["v_proj"], pool.layers[0]["q_proj"]
    assert v.dora_mask == 1 << slot and q.dora_mask == 0
    assert (v.dora[slot] - 1.2).abs().max() < 0.05  # m scaled by 1.2 over the norm PEFT initialised it to
    assert q.dora is None  # no table for a module no DoRA adapter has touched
    pool.release(slot)
    assert pool.evict("dora")
    assert v.dora_mask == 0 and torch.equal(v.dora, torch.ones_like(v.dora))


def test_bitsandbytes_dequantize_is_wrong_after_its_cpu_repack_and_the_runner_is_not(tiny_base, tiny_geometry):
    """Why the runner reads ||W|| through the served projection: once bitsandbytes has repacked an
    NF4 weight for its fused CPU kernel, dequantize_4bit (and PEFT's DoRA, which uses it) reads
    the new layout as if it were the old one."""
    import bitsandbytes.functional as bnbf

    from lorad.server.model_runner import _weight_row_sq
    from lorad.server.nf4_cpu import FusedNF4, nf4_route

    model = quantized_copy(tiny_base.model)
    module = model.model.layers[0].mlp.up_proj
    before = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if nf4_route(module.eval()) != "fused":
        pytest.skip("bitsandbytes does not repack NF4 weights on this CPU")
    served = FusedNF4([module])  # how the runner serves it: repacked for the fused kernel
    after = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    assert (after - before).abs().max() > 0.1 * before.abs().max()  # the layout changed under it
    torch.testing.assert_close(_weight_row_sq(served, torch.float32), before.square().sum(1), rtol=2e-2, atol=1e-4)
