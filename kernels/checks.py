"""Argument checks shared by every implementation of the LoRA ops.

Each failure names the offending argument and what was expected, so a caller can fix it
without reading the kernel.
"""

from __future__ import annotations

import torch

from lorad.kernels.metadata import LoRABatchMeta

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fail(msg: str) -> None:
    raise ValueError(msg)


def check_meta_device(meta: LoRABatchMeta, device: torch.device) -> None:
    if meta.sorted_token_ids.device != device:
        _fail(f"meta was built on {meta.sorted_token_ids.device} but the tensors are on {device}: "
              f"pass device= to build_lora_meta")


def slots_row_major(pool: torch.Tensor) -> bool:
    """[S, R, H] whose slots are each row-major [R, H]: a contiguous pool, or a rank slice
    pool[:, :r] of a wider one (slots then lie further apart than r * H)."""
    _, R, H = pool.shape
    s0, s1, s2 = pool.stride()
    return s2 == 1 and s1 == H and s0 >= R * H


# The checks run for every adapted projection of every step (210 per decode step on SmolLM2),
# so each reads a tensor attribute once; a failure is still one sentence naming the argument.


def check_shrink_args(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRABatchMeta, out: torch.Tensor | None) -> None:
    x_shape, a_shape = x.shape, lora_a.shape
    if len(x_shape) != 2:
        _fail(f"x must be [T, H_in], got shape {tuple(x_shape)}")
    if len(a_shape) != 3:
        _fail(f"lora_a must be [S, R, H_in], got shape {tuple(a_shape)}")
    dtype = x.dtype
    if dtype not in FLOAT_DTYPES:
        _fail(f"x dtype {dtype} is not one of float32, float16, bfloat16")
    if lora_a.dtype != dtype:
        _fail(f"lora_a dtype {lora_a.dtype} differs from x dtype {dtype}")
    if a_shape[2] != x_shape[1]:
        _fail(f"lora_a in-features {a_shape[2]} differ from x features {x_shape[1]}")
    if x_shape[0] != meta.num_tokens:
        _fail(f"x has {x_shape[0]} tokens but meta was built for {meta.num_tokens}")
    if not x.is_contiguous():
        _fail("x must be contiguous")
    if not slots_row_major(lora_a):
        _fail("lora_a: every slot must be a row-major [R, H_in] matrix (the pool, or a rank slice pool[:, :r])")
    if meta.num_active and meta.active_slots_host[-1] >= a_shape[0]:
        _fail(f"meta uses slot {meta.active_slots_host[-1]} but lora_a has {a_shape[0]} slots")
    device = x.device
    if lora_a.device != device:
        _fail(f"x is on {device} but lora_a on {lora_a.device}")
    check_meta_device(meta, device)
    if out is not None:
        if out.shape != (x_shape[0], a_shape[1]):
            _fail(f"out must be [T, R] = {(x_shape[0], a_shape[1])}, got {tuple(out.shape)}")
        if out.dtype != torch.float32:
            _fail(f"out must be float32 (the accumulation dtype), got {out.dtype}")
        if not out.is_contiguous():
            _fail("out must be contiguous")


def check_expand_args(
    y: torch.Tensor, v: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor, meta: LoRABatchMeta
) -> None:
    check_output_args(y, lora_b, scale, meta)
    if v.dim() != 2 or v.shape != (y.shape[0], lora_b.shape[1]):
        _fail(f"v must be [T, R] = {(y.shape[0], lora_b.shape[1])}, got {tuple(v.shape)}")
    if v.dtype != torch.float32:
        _fail(f"v must be float32 (as lora_shrink returns it), got {v.dtype}")
    if not v.is_contiguous():
        _fail("v must be contiguous")
    if v.device != y.device:
        _fail(f"v is on {v.device} but y on {y.device}")


def check_output_args(y: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor, meta: LoRABatchMeta) -> None:
    """The expand side's arguments other than v (add_lora has no v to check)."""
    y_shape, b_shape = y.shape, lora_b.shape
    if len(y_shape) != 2:
        _fail(f"y must be [T, H_out], got shape {tuple(y_shape)}")
    if len(b_shape) != 3:
        _fail(f"lora_b must be [S, R, H_out], got shape {tuple(b_shape)}")
    dtype = y.dtype
    if dtype not in FLOAT_DTYPES:
        _fail(f"y dtype {dtype} is not one of float32, float16, bfloat16")
    if lora_b.dtype != dtype:
        _fail(f"lora_b dtype {lora_b.dtype} differs from y dtype {dtype}")
    if b_shape[2] != y_shape[1]:
        _fail(f"lora_b out-features {b_shape[2]} differ from y features {y_shape[1]}")
    if scale.shape != (b_shape[0],):
        _fail(f"scale must be [S] = ({b_shape[0]},), got {tuple(scale.shape)}")
    if scale.dtype != torch.float32:
        _fail(f"scale must be float32, got {scale.dtype}")
    if y_shape[0] != meta.num_tokens:
        _fail(f"y has {y_shape[0]} tokens but meta was built for {meta.num_tokens}")
    if y.stride(1) != 1 and y_shape[1] > 1:  # a column slice of a wider output qualifies
        _fail("y must be contiguous along its rows (y.stride(1) == 1)")
    if not slots_row_major(lora_b):
        _fail("lora_b: every slot must be a row-major [R, H_out] matrix (the pool, or a rank slice pool[:, :r])")
    if meta.num_active and meta.active_slots_host[-1] >= b_shape[0]:
        _fail(f"meta uses slot {meta.active_slots_host[-1]} but lora_b has {b_shape[0]} slots")
    device = y.device
    if lora_b.device != device or scale.device != device:
        _fail(f"y, lora_b and scale must share a device, got {device}, {lora_b.device}, {scale.device}")
    check_meta_device(meta, device)


def check_add_lora_args(y, x, lora_a, lora_b, scale, meta) -> None:
    check_shrink_args(x, lora_a, meta, None)
    check_output_args(y, lora_b, scale, meta)
    if lora_a.shape[:2] != lora_b.shape[:2]:
        _fail(f"lora_a [S, R] = {tuple(lora_a.shape[:2])} and lora_b [S, R] = {tuple(lora_b.shape[:2])} differ")


def check_dora_scale(dora_scale: torch.Tensor, lora_b: torch.Tensor) -> None:
    S, H_out = lora_b.shape[0], lora_b.shape[2]
    if dora_scale.shape != (S, H_out):
        _fail(f"dora_scale must be [S, H_out] = {(S, H_out)}, got {tuple(dora_scale.shape)}")
    if dora_scale.dtype != torch.float32:
        _fail(f"dora_scale must be float32, got {dora_scale.dtype}")
    if not dora_scale.is_contiguous():
        _fail("dora_scale must be contiguous")
    if dora_scale.device != lora_b.device:
        _fail(f"dora_scale is on {dora_scale.device} but lora_b on {lora_b.device}")
