"""A lean call into bitsandbytes' fused NF4 matmul on CPU.

In eval mode on a CPU with AVX512-BF16, bitsandbytes' Linear4bit repacks its weight once and
then runs every forward through one fused C kernel (`gemv_4bit_inference_cpu_nf4_bf16`,
bf16 activations, fp32 accumulation). Around that kernel its Python path spends ~50 us per
call (quant-state checks, a tensor comparison to tell NF4 from FP4, dtype round trips): about
10 ms of every decode step over SmolLM2's 210 projections. `FastNF4Linear` calls the same
kernel with the same arguments and nothing else, so its output is bit-identical to the
module's (tests/test_nf4_cpu.py checks that).

When the fast path does not apply (no AVX512-BF16, FP4 weights, CUDA, a bitsandbytes without
the symbol), `wrap_linear` returns the module itself.
"""

from __future__ import annotations

import ctypes
import logging

import torch

log = logging.getLogger(__name__)


class FastNF4Linear:
    def __init__(self, module, fn):
        state = module.weight.quant_state
        self.module = module
        self.fn = fn
        self.weight = module.weight.data  # [N, K/2] uint8, CPU-packed layout
        self.absmax = state.absmax  # bf16, repacked by bitsandbytes
        self.blocksize = state.blocksize
        self.out_features, self.in_features = state.shape
        self.bias = module.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [M, K] -> [M, N], computed in bf16 like bitsandbytes, returned in x.dtype
        xb = x.to(torch.bfloat16)
        if not xb.is_contiguous():
            xb = xb.contiguous()
        M = xb.shape[0]
        out = torch.empty(M, self.out_features, dtype=torch.bfloat16)
        self.fn(
            ctypes.c_int64(M),
            ctypes.c_int64(self.out_features),
            ctypes.c_int64(self.in_features),
            ctypes.c_void_p(xb.data_ptr()),
            ctypes.c_void_p(self.weight.data_ptr()),
            ctypes.c_void_p(self.absmax.data_ptr()),
            ctypes.c_void_p(out.data_ptr()),
            ctypes.c_int64(self.blocksize),
            ctypes.c_int64(xb.stride(0)),
            ctypes.c_int64(out.stride(0)),
        )
        out = out.to(x.dtype)
        if self.bias is not None:
            out += self.bias.to(x.dtype)
        return out


def _hub_kernel_active() -> bool:
    """bitsandbytes prefers a kernels-hub GEMM when the `kernels` package provides one."""
    try:
        from bitsandbytes.backends.cpu import ops
    except ImportError:
        return False
    return getattr(ops, "gemm_4bit_forward_kernel", None) is not None


def wrap_linear(module):
    """FastNF4Linear for an eval-mode CPU NF4 Linear4bit that bitsandbytes runs fused; else module."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.cextension import lib
    except ImportError:
        return module
    if not isinstance(module, bnb.nn.Linear4bit) or module.weight.device.type != "cpu":
        return module
    if not getattr(module, "support_avx512bf16_for_cpu", False) or module.training:
        return module
    state = module.weight.quant_state
    if state is None or state.quant_type != "nf4":
        return module
    fn = getattr(lib, "gemv_4bit_inference_cpu_nf4_bf16", None)
    if fn is None or _hub_kernel_active():
        return module
    if not getattr(state, "packing_format_for_cpu", False):
        with torch.inference_mode():  # one forward makes bitsandbytes repack the weight
            module(torch.zeros(1, module.in_features, dtype=torch.float32))
        state = module.weight.quant_state
        if not getattr(state, "packing_format_for_cpu", False):
            return module
    return FastNF4Linear(module, fn)
