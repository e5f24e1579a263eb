"""add_lora for the CPU's decode layout in C (kernels/lora_cpu.c): the "cpu" LoRA backend.

Decode batches lay tokens out grouped by slot in equal segments (`meta.pad_identity`): adapter
i's tokens are rows [pad_first + i * L, pad_first + (i + 1) * L). There the twin runs three
torch calls (bmm, mul, bmm + add) whose batched-GEMM setup for [2, 576] x [576, 16]-sized
problems costs about as much as reading the weights; the C kernel reads each adapter's A and B
rows once per pair of its tokens (once in all at decode's two tokens per adapter), straight
into FMAs. Every other layout, dtype or device goes to the twin (`add_lora_torch`), which
stays the oracle.

Contract: that of lorad.kernels.add_lora for float32 tensors (fp32 accumulation; the twin and
the kernel sum in different orders, so they agree to float32 rounding, not bit for bit).
Built on first use (lorad.kernels.native_build).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from lorad.kernels.checks import check_add_lora_args
from lorad.kernels.lora_ops_torch import add_lora_torch
from lorad.kernels.metadata import LoRABatchMeta
from lorad.kernels.native_build import NativeKernel

MAX_RANK = 256  # the C kernel's v buffer; larger ranks go to the twin


_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_KERNEL = NativeKernel(Path(__file__).with_name("lora_cpu.c"), "lorad_lora_decode_f32",
                       # n, L, r, H_in, H_out, x, ldx, a, a_stride, b, b_stride, scale, y, ldy, threads
                       [_i64, _i64, _i64, _i64, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, _i64])


@torch.compiler.assume_constant_result  # resolve_backend runs inside traced steps: decided once, at trace time
def available() -> bool:
    return _KERNEL.available()


def unavailable_reason() -> str:
    return _KERNEL.unavailable_reason()


def _kernel_applies(y, x, lora_a, lora_b, meta: LoRABatchMeta) -> bool:
    return (meta.pad_identity and y.device.type == "cpu" and x.dim() == 2 and lora_a.dim() == lora_b.dim() == 3
            and y.dtype == x.dtype == lora_a.dtype == lora_b.dtype == torch.float32
            and y.stride(1) == 1 and x.stride(1) == 1
            and lora_a.stride(2) == 1 and lora_a.stride(1) == lora_a.shape[2]
            and lora_b.stride(2) == 1 and lora_b.stride(1) == lora_b.shape[2]
            and lora_a.shape[1] <= MAX_RANK)


def add_lora_cpu(
    y: torch.Tensor,  # [T, H_out], modified in place
    x: torch.Tensor,  # [T, H_in]
    lora_a: torch.Tensor,  # [S, R, H_in]
    lora_b: torch.Tensor,  # [S, R, H_out]
    scale: torch.Tensor,  # [S] float32
    meta: LoRABatchMeta,
) -> None:
    """lorad.kernels.add_lora: the C kernel for the fp32 decode layout, the twin otherwise."""
    kernel = _KERNEL.function
    if kernel is None or not _kernel_applies(y, x, lora_a, lora_b, meta):
        add_lora_torch(y, x, lora_a, lora_b, scale, meta)
        return
    check_add_lora_args(y, x, lora_a, lora_b, scale, meta)
    if meta.no_lora:
        return
    n, L, p0, lo = meta.n_range, meta.max_seg_len, meta.pad_first, meta.slot_lo
    if scale.stride(0) != 1:
        scale = scale.contiguous()
    # pointers to row p0 / slot lo, in bytes (float32), rather than slicing views: 210 calls a step
    status = kernel(
        n, L, lora_a.shape[1], x.shape[1], y.shape[1],
        x.data_ptr() + 4 * p0 * x.stride(0), x.stride(0),
        lora_a.data_ptr() + 4 * lo * lora_a.stride(0), lora_a.stride(0),
        lora_b.data_ptr() + 4 * lo * lora_b.stride(0), lora_b.stride(0),
        scale.data_ptr() + 4 * lo, y.data_ptr() + 4 * p0 * y.stride(0), y.stride(0), torch.get_num_threads())
    if status:
        raise RuntimeError(f"lorad_lora_decode_f32 failed with status {status}")
