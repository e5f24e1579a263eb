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


def check_shrink_args(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRABatchMeta, out: torch.Tensor | None) -> None:
    if x.dim() != 2:
        _fail(f"x must be [T, H_in], got shape {tuple(x.shape)}")
    if lora_a.dim() != 3:
        _fail(f"lora_a must be [S, R, H_in], got shape {tuple(lora_a.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        _fail(f"x dtype {x.dtype} is not one of float32, float16, bfloat16")
    if lora_a.dtype != x.dtype:
        _fail(f"lora_a dtype {lora_a.dtype} differs from x dtype {x.dtype}")
    if lora_a.shape[2] != x.shape[1]:
        _fail(f"lora_a in-features {lora_a.shape[2]} differ from x features {x.shape[1]}")
    if x.shape[0] != meta.num_tokens:
        _fail(f"x has {x.shape[0]} tokens but meta was built for {meta.num_tokens}")
    if not x.is_contiguous():
        _fail("x must be contiguous")
    if not lora_a.is_contiguous():
        _fail("lora_a must be contiguous")
    if meta.num_active and meta.active_slots_host[-1] >= lora_a.shape[0]:
        _fail(f"meta uses slot {meta.active_slots_host[-1]} but lora_a has {lora_a.shape[0]} slots")
    if x.device != lora_a.device:
        _fail(f"x is on {x.device} but lora_a on {lora_a.device}")
    check_meta_device(meta, x.device)
    if out is not None:
        if out.shape != (x.shape[0], lora_a.shape[1]):
            _fail(f"out must be [T, R] = {(x.shape[0], lora_a.shape[1])}, got {tuple(out.shape)}")
        if out.dtype != torch.float32:
            _fail(f"out must be float32 (the accumulation dtype), got {out.dtype}")
        if not out.is_contiguous():
            _fail("out must be contiguous")


def check_expand_args(
    y: torch.Tensor, v: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor, meta: LoRABatchMeta
) -> None:
    if y.dim() != 2:
        _fail(f"y must be [T, H_out], got shape {tuple(y.shape)}")
    if lora_b.dim() != 3:
        _fail(f"lora_b must be [S, R, H_out], got shape {tuple(lora_b.shape)}")
    if v.dim() != 2 or v.shape != (y.shape[0], lora_b.shape[1]):
        _fail(f"v must be [T, R] = {(y.shape[0], lora_b.shape[1])}, got {tuple(v.shape)}")
    if v.dtype != torch.float32:
        _fail(f"v must be float32 (as lora_shrink returns it), got {v.dtype}")
    if y.dtype not in FLOAT_DTYPES:
        _fail(f"y dtype {y.dtype} is not one of float32, float16, bfloat16")
    if lora_b.dtype != y.dtype:
        _fail(f"lora_b dtype {lora_b.dtype} differs from y dtype {y.dtype}")
    if lora_b.shape[2] != y.shape[1]:
        _fail(f"lora_b out-features {lora_b.shape[2]} differ from y features {y.shape[1]}")
    if scale.shape != (lora_b.shape[0],):
        _fail(f"scale must be [S] = ({lora_b.shape[0]},), got {tuple(scale.shape)}")
    if scale.dtype != torch.float32:
        _fail(f"scale must be float32, got {scale.dtype}")
    if y.shape[0] != meta.num_tokens:
        _fail(f"y has {y.shape[0]} tokens but meta was built for {meta.num_tokens}")
    if not y.is_contiguous():
        _fail("y must be contiguous")
    if not lora_b.is_contiguous() or not v.is_contiguous():
        _fail("lora_b and v must be contiguous")
    if meta.num_active and meta.active_slots_host[-1] >= lora_b.shape[0]:
        _fail(f"meta uses slot {meta.active_slots_host[-1]} but lora_b has {lora_b.shape[0]} slots")
    if not (y.device == v.device == lora_b.device == scale.device):
        _fail(f"y, v, lora_b and scale must share a device, got {y.device}, {v.device}, {lora_b.device}, {scale.device}")
    check_meta_device(meta, y.device)


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
