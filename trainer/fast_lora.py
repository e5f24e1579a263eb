"""The LoRA projection of a training step as one autograd function, in place of PEFT's forward.

    y = x W^T + s * (drop(x) A^T) B^T         x: [N, in], W: [out, in] (NF4 or plain),
                                              A: [r, in], B: [out, r], s = alpha / r (or / sqrt r)

PEFT computes the same thing from separate modules (bitsandbytes' MatMul4Bit, a Dropout, two
Linears, a multiply), which on a CPU costs more than the arithmetic needs (measured on the
benchmark config, trainer/README.md "Speed"):
  * dropout: torch draws the Bernoulli mask at ~60 M elements/s on one core; for the 5% LoRA
    dropout on every projection input that was ~17% of a step. `keep_mask` draws 16 random
    bits per element from 64-bit words instead (about 10x faster), same keep probability up to
    1/65536, from the same generator (so checkpoint recomputation and resume replay it);
  * casts: on CPU autocast PEFT casts x to float32 for the LoRA branch and bitsandbytes casts it
    to the compute dtype again; here x is cast once and the branch runs in the compute dtype;
  * the scaling multiplies the [N, r] intermediate, not the [N, out] output;
  * NF4: the weight is dequantized for the forward and again for the input gradient. Under
    gradient checkpointing the forward runs twice (once more to rebuild what backward needs),
    and the weight dequantized by that recomputation is kept for the backward that follows
    right after it, one layer at a time: two dequantizations per step instead of three.

Gradients (c = compute dtype; k = the dropout mask, q = 1 / (1 - p), applied to [N, r] tensors):
    u = (k * x) A^T     dB = g^T (s q u)     dA = (s q g B)^T (k * x)     dx = g W + k * ((s q g B) A)

Only plain LoRA layers take this path (one adapter, no DoRA, no lora_bias, not merged); every
other layer keeps PEFT's forward. tests/test_trainer_fast_lora.py checks values and gradients
against PEFT's forward.
"""

from __future__ import annotations

import types

import torch

# keep_mask: 16 random bits per element; an element is kept when its bits are >= threshold
_BITS = 16


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(mask [shape] bool, 1 / keep probability) for dropout with drop probability p.

    Semantics:
        mask = uniform(shape) >= p, quantized to 1/65536; drawn from torch's default generator
    """
    n = 1
    for d in shape:
        n *= d
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)  # 64 random bits each
    bits = words.view(torch.int16)[:n].view(shape)  # [shape] uniform over int16
    threshold = round(p * (1 << _BITS))
    keep = bits >= threshold - (1 << (_BITS - 1))
    return keep, (1 << _BITS) / ((1 << _BITS) - threshold)


class _LoRAProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, scaling: float, p: float, compute_dtype, out_dtype, keep_weight: bool):
        # x: [N, in]; lora_a: [r, in]; lora_b: [out, r]; base: the frozen projection (Linear or bnb Linear4bit)
        c = compute_dtype
        xc = x.to(c)  # [N, in]
        weight = dequantized_weight(base, c)  # [out, in]
        y = xc @ weight.t()  # [N, out]
        if base.bias is not None:
            y += base.bias.to(c)
        if p > 0:
            # dropout's 1 / (1 - p) is applied to the [N, r] product below, not to [N, in]
            keep, scale = keep_mask(xc.shape, p, xc.device)
            xd = torch.where(keep, xc, xc.new_zeros(()))  # [N, in]; a 0-d tensor is faster than a Python 0
        else:
            keep, scale, xd = None, 1.0, xc
        a, b = lora_a.to(c), lora_b.to(c)
        us = (xd @ a.t()) * (scaling * scale)  # [N, r]
        y.addmm_(us, b.t())  # [N, out]
        ctx.save_for_backward(xd, us, a, b, keep, weight if keep_weight else None)
        ctx.base, ctx.scaling, ctx.c = base, scaling * scale, c
        ctx.x_dtype, ctx.a_dtype, ctx.b_dtype = x.dtype, lora_a.dtype, lora_b.dtype
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        xd, us, a, b, keep, weight = ctx.saved_tensors
        g = grad.to(ctx.c)  # [N, out]
        gus = g @ b  # [N, r]
        grad_b = (g.t() @ us).to(ctx.b_dtype)  # [out, r]
        gu = gus * ctx.scaling  # [N, r]
        grad_a = (gu.t() @ xd).to(ctx.a_dtype)  # [r, in]
        grad_x = None
        if ctx.needs_input_grad[0]:
            if weight is None:
                weight = dequantized_weight(ctx.base, ctx.c)
            grad_lora = gu @ a  # [N, in]; dropout's scale is already in gu
            if keep is not None:
                grad_lora = torch.where(keep, grad_lora, grad_lora.new_zeros(()))
            if ctx.x_dtype == ctx.c:
                grad_x = torch.addmm(grad_lora, g, weight)  # [N, in]
            else:  # sum the two branches in x's (wider) dtype, as autograd does for PEFT's two casts of x
                grad_x = (g @ weight).to(ctx.x_dtype).add_(grad_lora.to(ctx.x_dtype))  # [N, in]
        return grad_x, grad_a, grad_b, None, None, None, None, None, None


def dequantized_weight(base, dtype: torch.dtype) -> torch.Tensor:
    """The frozen projection's weight [out, in] in `dtype` (NF4 is dequantized)."""
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).to(dtype)
    return weight.to(dtype)


def _fast_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Replaces a PEFT LoRA layer's forward (bound to the layer)."""
    if args or kwargs or self.merged or self.disable_adapters or self.active_adapters != ["default"]:
        return self._peft_forward(x, *args, **kwargs)
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    quantized = getattr(self.base_layer.weight, "quant_state", None) is not None
    if quantized:
        compute = self.base_layer.weight.quant_state.dtype
        out_dtype = x.dtype  # bitsandbytes returns the input's dtype
    else:
        compute = torch.get_autocast_dtype(device) if autocast else x.dtype
        out_dtype = compute
    dropout = self.lora_dropout["default"]
    p = dropout.p if (self.training and isinstance(dropout, torch.nn.Dropout)) else 0.0
    shape = x.shape
    with torch.autocast(device, enabled=False):
        y = _LoRAProjection.apply(
            x.reshape(-1, shape[-1]), self.lora_A["default"].weight, self.lora_B["default"].weight, self.base_layer,
            float(self.scaling["default"]), p, compute, out_dtype, self._keep_dequantized,
        )
    return y.view(*shape[:-1], y.shape[-1])


def eligible(module) -> bool:
    """A PEFT LoRA layer with exactly one plain LoRA adapter: what _LoRAProjection computes."""
    return (
        hasattr(module, "lora_A") and hasattr(module, "base_layer")
        and list(module.lora_A.keys()) == ["default"]
        and not module.lora_variant  # DoRA and friends keep PEFT's forward
        and not getattr(module, "lora_bias", {}).get("default", False)
        and isinstance(module.base_layer, torch.nn.Linear)  # nn.Linear and bnb.nn.Linear4bit
        and not getattr(module, "fan_in_fan_out", False)
    )


def use_fast_lora(model, keep_dequantized: bool) -> int:
    """Route every eligible LoRA layer of `model` through _LoRAProjection; returns how many.

    keep_dequantized: keep the weight a forward dequantized for the backward. Set it with
    gradient checkpointing only: there the forward whose tensors backward uses is the
    recomputation just before that layer's backward, so one layer's weight is held at a time;
    without checkpointing every layer's would be held until its backward (the whole base in
    the compute dtype)."""
    count = 0
    for module in model.modules():
        if eligible(module) and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module._keep_dequantized = keep_dequantized
            module.forward = types.MethodType(_fast_forward, module)
            count += 1
    return count
