"""NF4 x fp32 matmul on AVX2 CPUs (kernels/nf4_avx2.c), and its PyTorch twin.

bitsandbytes runs an NF4 `Linear4bit` on the CPU through a fused kernel only where the CPU has
AVX512-BF16. Elsewhere it dequantizes the whole weight to fp32 on every call, and the engine's
alternative, an fp32 copy kept once (lorad.server.nf4_cpu.DequantizedNF4), reads 8x the NF4
bytes every decode step: on an AVX2 machine that is most of a batch-1 step. This kernel reads
the packed 4-bit weights and decodes them in registers (a byte lookup per byte of the fp32 code
value): for up to 4 rows of x straight into the dot products, for more into a buffer of 3
weight rows that a 4 x 3 register tile reads (as fast as MKL's sgemm on an fp32 copy up to
~128 rows). No library does this for bitsandbytes' layout on AVX2, hence ~150 lines of C,
compiled on first use with the system's C compiler and cached.

Contract (the kernel and `nf4_matmul_torch` alike):

    nf4_matmul(x, weight, absmax, code) -> y
      x       [M, K] float32, rows contiguous (x.stride(1) == 1); K a multiple of 64
      weight  uint8, N * K / 2 bytes, contiguous: the row-major [N, K] matrix of 4-bit indices,
              two per byte, high nibble first (the layout of bitsandbytes' Linear4bit weight)
      absmax  [N * K / 64] float32: the scale of each run of 64 weights in that order
              (bitsandbytes' nested absmax already dequantized)
      code    [16] float32: the value of each index (bitsandbytes' NF4 table)
      y       [M, N] float32: y[m, n] = sum_k x[m, k] * code[q[n, k]] * absmax[(n * K + k) // 64]

Both sum in float32, in different orders: the twin scales each weight, then multiplies (as
bitsandbytes' fallback does); the kernel does the same for more than 4 rows, and for up to 4
sums each run of 64 unscaled products, then scales the run. They agree to float32 rounding
(both within 5e-7 of max |y| of an fp64 reference at K = 1536; tests/test_nf4_avx2.py allows
2e-6); they are not bit-identical.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from lorad.kernels.native_build import NativeKernel

BLOCK = 64  # weights per absmax scale; the kernel supports bitsandbytes' default only


_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_KERNEL = NativeKernel(Path(__file__).with_name("nf4_avx2.c"), "lorad_nf4_matmul_f32",
                       # M, N, K, x, ldx, w, absmax, code, y, ldy, threads
                       [_i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _i64])


def available() -> bool:
    return _KERNEL.available()


def unavailable_reason() -> str:
    """Why the kernel cannot run here ("" when it can)."""
    return _KERNEL.unavailable_reason()


def check_nf4_args(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> int:
    """The contract's checks; returns N."""
    if x.dim() != 2 or x.dtype != torch.float32 or x.stride(1) != 1:
        raise ValueError(f"x: expected [M, K] float32 with contiguous rows, got {tuple(x.shape)} {x.dtype}")
    for name, t in (("x", x), ("weight", weight), ("absmax", absmax), ("code", code)):
        if t.device.type != "cpu":
            raise ValueError(f"{name}: expected a CPU tensor, got one on {t.device}")
    K = x.shape[1]
    if K == 0 or K % BLOCK:
        raise ValueError(f"x: K = {K} is not a positive multiple of {BLOCK}")
    if weight.dtype != torch.uint8 or not weight.is_contiguous() or (2 * weight.numel()) % K:
        raise ValueError(f"weight: expected contiguous uint8 holding N x {K} 4-bit indices, got "
                         f"{weight.numel()} {weight.dtype}")
    N = 2 * weight.numel() // K
    if absmax.dtype != torch.float32 or not absmax.is_contiguous() or absmax.numel() != N * K // BLOCK:
        raise ValueError(f"absmax: expected {N * K // BLOCK} contiguous float32 scales, got {absmax.numel()} "
                         f"{absmax.dtype}")
    if code.dtype != torch.float32 or not code.is_contiguous() or code.numel() != 16:
        raise ValueError(f"code: expected 16 contiguous float32 values, got {code.numel()} {code.dtype}")
    return N


def nf4_matmul(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
               threads: int | None = None) -> torch.Tensor:
    """The kernel (contract above); threads: OpenMP threads (None: torch.get_num_threads())."""
    kernel = _KERNEL.function
    if kernel is None:
        raise RuntimeError(f"the NF4 AVX2 kernel is unavailable: {_KERNEL.unavailable_reason()}")
    N = check_nf4_args(x, weight, absmax, code)
    M, K = x.shape
    y = torch.empty(M, N, dtype=torch.float32)
    if M == 0 or N == 0:
        return y
    status = kernel(M, N, K, x.data_ptr(), x.stride(0), weight.data_ptr(), absmax.data_ptr(),
                                      code.data_ptr(), y.data_ptr(), N, threads or torch.get_num_threads())
    if status:
        raise RuntimeError(f"lorad_nf4_matmul_f32 failed with status {status}")
    return y


def nf4_dequantize_torch(weight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, K: int) -> torch.Tensor:
    """[N, K] float32: each weight's code value times its run's scale."""
    packed = weight.reshape(-1)
    idx = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1).long()  # high nibble first
    values = code[idx].view(-1, BLOCK) * absmax.view(-1, 1)
    return values.view(-1, K)


def nf4_matmul_torch(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                     threads: int | None = None) -> torch.Tensor:
    """The PyTorch twin (contract above): dequantize, then one matmul. threads is ignored."""
    check_nf4_args(x, weight, absmax, code)
    return x @ nf4_dequantize_torch(weight, absmax, code, x.shape[1]).T
