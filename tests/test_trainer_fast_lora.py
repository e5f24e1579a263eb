"""trainer/fast_lora.py against PEFT's own forward: the same outputs and the same gradients for
LoRA A, LoRA B and the layer input, on NF4 and unquantized projections, in float32 and under bf16
autocast, with and without gradient checkpointing; and its dropout mask has the right statistics
and is the one the gradient uses. Tiny random Llama, LoRA B nonzero (else the check is vacuous)."""

from __future__ import annotations

import copy

import pytest
import torch

from lorad.trainer.fast_lora import eligible, keep_mask, use_fast_lora


def lora_model(tiny_base, quant: str, dtype: torch.dtype, dropout: float = 0.0, checkpointing: bool = False):
    from peft import LoraConfig, get_peft_model

    from lorad.trainer.recipe import keep_bnb_training_layout

    model = copy.deepcopy(tiny_base.model)
    if quant == "nf4":
        import bitsandbytes as bnb

        from lorad.base_model import quantization_config  # noqa: F401 (the settings lorad uses: NF4, double quant)

        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, torch.nn.Linear) and child_name.endswith("_proj"):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=dtype,
                                          quant_type="nf4", compress_statistics=True)
                    q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True).to("cpu")
                    setattr(module, child_name, q)
        keep_bnb_training_layout(model)
    model.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                                             target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]))
    model.train()
    return model


def step(model, ids, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, use_cache=False).logits.float()
    loss = out.square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out.detach(), grads


@pytest.mark.parametrize("quant, autocast", [("none", False), ("nf4", False), ("nf4", True), ("none", True)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fast_lora_equals_peft(tiny_base, quant, autocast, checkpointing):
    """float32: equal to rounding. bf16 autocast: both round differently, so each is compared with
    a float32 run of the same weights, and the fast path may be off by at most twice PEFT's own
    bf16 error (STYLE.md rule 4)."""
    dtype = torch.bfloat16 if autocast else torch.float32
    peft = lora_model(tiny_base, quant, dtype, checkpointing=checkpointing)
    fast = copy.deepcopy(peft)
    assert use_fast_lora(fast, keep_dequantized=checkpointing) == 8  # 2 layers x 4 targets
    ids = torch.randint(5, 1000, (2, 17))
    out_p, grads_p = step(peft, ids, autocast)
    out_f, grads_f = step(fast, ids, autocast)
    assert sorted(grads_f) == sorted(grads_p) and len(grads_p) == 16
    if not autocast:
        torch.testing.assert_close(out_f, out_p, rtol=1e-4, atol=1e-5)
        for name in grads_p:
            assert grads_p[name].abs().max() > 0, name
            torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-4, atol=1e-4 * grads_p[name].abs().max().item())
        return
    out_r, grads_r = step(lora_model(tiny_base, quant, torch.float32, checkpointing=checkpointing), ids, False)
    assert (out_f - out_r).norm() <= 2 * (out_p - out_r).norm() + 1e-6
    errors = {}
    for name in grads_r:
        scale = grads_r[name].norm()
        assert scale > 0, name
        errors[name] = (float((grads_f[name] - grads_r[name]).norm() / scale),
                        float((grads_p[name] - grads_r[name]).norm() / scale))
    # relative Frobenius errors against float32, over all LoRA tensors and for each one
    fast_total, peft_total = (sum(e[i] for e in errors.values()) for i in (0, 1))
    assert fast_total <= 1.5 * peft_total, errors
    assert all(f <= 2 * p + 1e-3 for f, p in errors.values()), errors


def test_fast_dropout_uses_the_mask_it_draws(tiny_base):
    """With dropout the forward draws a mask; the same draw (same seed) in a hand-written
    reference must give the same output and LoRA gradients."""
    model = lora_model(tiny_base, "none", torch.float32, dropout=0.3)
    use_fast_lora(model, keep_dequantized=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, 64, requires_grad=True)
    torch.manual_seed(123)
    y = layer(x)
    y.square().sum().backward()
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    got = (y.detach(), a.grad.clone(), b.grad.clone(), x.grad.clone())
    a.grad = b.grad = x.grad = None
    torch.manual_seed(123)
    keep, scale = keep_mask(torch.Size([15, 64]), 0.3, x.device)
    assert 0.5 < keep.float().mean() < 0.9 and scale == pytest.approx(1 / 0.7, rel=1e-4)
    xd = x.reshape(15, 64) * keep * scale
    ref = x.reshape(15, 64) @ layer.base_layer.weight.t() + s * (xd @ a.t()) @ b.t()
    ref.square().sum().backward()
    expected = (ref.detach().view(3, 5, -1), a.grad, b.grad, x.grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=2e-4, atol=1e-4)  # float32; the scale is applied at another point
    model.eval()  # no dropout in eval: two calls agree
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer(x))


def test_keep_mask_statistics():
    torch.manual_seed(0)
    for p in (0.05, 0.1, 0.5):
        keep, scale = keep_mask(torch.Size([512, 1024]), p, torch.device("cpu"))
        assert keep.float().mean().item() == pytest.approx(1 - p, abs=3e-3)
        assert scale == pytest.approx(1 / (1 - p), rel=2e-4)
    # consecutive draws differ (the generator advances)
    a, _ = keep_mask(torch.Size([4096]), 0.5, torch.device("cpu"))
    b, _ = keep_mask(torch.Size([4096]), 0.5, torch.device("cpu"))
    assert (a != b).any()


def test_variants_keep_peft_forward(tiny_base):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(tiny_base.model),
                           LoraConfig(r=4, use_dora=True, target_modules=["q_proj"], init_lora_weights=False))
    assert use_fast_lora(model, keep_dequantized=False) == 0
    assert not any(eligible(m) for m in model.modules())
