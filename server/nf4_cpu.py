"""NF4 projections on the CPU: one call per group of projections that share their input.

bitsandbytes runs an NF4 `Linear4bit` on the CPU in one of two ways, depending on the CPU:

* **AVX512-BF16**: in eval mode the module repacks its weight once, then every forward runs one
  fused C kernel (`gemv_4bit_inference_cpu_nf4_bf16`: bf16 activations, fp32 accumulation).
  Around it the module's Python spends ~50 us per call (quant-state checks, a tensor
  comparison to tell NF4 from FP4, dtype round trips). `FusedNF4` calls the same kernel with
  the same arguments and nothing else, for q/k/v (or gate/up) at once: their packed weights
  concatenated along the output dimension. The kernel computes every output column from its
  own rows of the weight, so the result is bit-identical to each module's forward
  (tests/test_nf4_cpu.py).
* **otherwise (AVX2 CPUs)**: every forward dequantizes the whole weight to the compute dtype
  (several passes over 8x the NF4 bytes) and then runs `F.linear`; a batch-1 decode step of
  SmolLM2 spends most of its time there. `DequantizedNF4` dequantizes once, with the very
  ops and arguments bitsandbytes' fallback uses, and keeps the fp32 copy: each forward is the
  fallback's own `F.linear` on the same weight, so its output is bit-identical too, at 8x the
  NF4 memory (budgeted by EngineConfig.dequant_memory). `KernelNF4` runs lorad's own NF4
  kernel (lorad.kernels.nf4_avx2) on the packed weights instead for batches of up to
  EngineConfig.nf4_kernel_rows rows, and for every batch of the layers past the copies'
  budget: 1/8 of the copy's bytes, equal to float32 rounding rather than bit for bit.

`nf4_route(module)` says which applies to a module.
"""

from __future__ import annotations

import ctypes
import logging

import torch
import torch.nn.functional as F

from lorad.kernels.nf4_avx2 import BLOCK, nf4_matmul

log = logging.getLogger(__name__)


def _is_nf4_linear(module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return isinstance(module, bnb.nn.Linear4bit) and state is not None and state.quant_type == "nf4"


def _fused_kernel():
    """bitsandbytes' fused NF4 CPU kernel, or None when this build lacks it or a kernels-hub
    GEMM replaces it (then the module's own forward is the reference, not our call)."""
    try:
        from bitsandbytes.cextension import lib
    except ImportError:
        return None
    try:
        from bitsandbytes.backends.cpu import ops
    except ImportError:
        ops = None
    if getattr(ops, "gemm_4bit_forward_kernel", None) is not None:
        return None
    return getattr(lib, "gemv_4bit_inference_cpu_nf4_bf16", None)


def nf4_route(module) -> str | None:
    """"fused" (bitsandbytes runs this module through its fused CPU kernel), "dequant" (it
    dequantizes the weight on every call), or None (not an eval-mode NF4 Linear4bit on CPU)."""
    if not _is_nf4_linear(module) or module.weight.device.type != "cpu" or module.training:
        return None
    if getattr(module, "support_avx512bf16_for_cpu", False) and _fused_kernel() is not None:
        return "fused"
    return "dequant"


def _packed_for_cpu(module):
    """The module's weight in bitsandbytes' fused-kernel layout (one forward makes it repack)."""
    if not getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        with torch.inference_mode():
            module(torch.zeros(1, module.in_features, dtype=torch.float32))
    state = module.weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        raise RuntimeError("bitsandbytes did not repack the NF4 weight for its CPU kernel")
    return module.weight.data, state


class FusedNF4:
    """y = concat_i(module_i(x)) for NF4 modules sharing x, in one call of bitsandbytes' kernel.

    The packed weights [N_i, K/2] uint8 are concatenated along N (the kernel's layout packs
    blocks of 32 output rows; every Llama projection has N % 32 == 0) and each module's weight
    becomes a view into the concatenation, so no byte is held twice. The per-block scales
    (absmax [K / blocksize, N_i] bf16 after repacking) are concatenated along N into a copy:
    they are 1/32 of the weight bytes.
    """

    route = "nf4-fused"

    def __init__(self, modules: list):
        self.fn = _fused_kernel()
        packed = [_packed_for_cpu(m) for m in modules]
        states = [s for _, s in packed]
        self.in_features = states[0].shape[1]
        self.blocksize = states[0].blocksize
        if any(s.shape[1] != self.in_features or s.blocksize != self.blocksize for s in states):
            raise ValueError("FusedNF4: the modules of a group must share in_features and blocksize")
        self.out_features = tuple(s.shape[0] for s in states)
        self.weight = torch.cat([w for w, _ in packed])  # [N, K/2] uint8
        offset = 0
        for m, n in zip(modules, self.out_features):
            m.weight.data = self.weight[offset : offset + n]  # a view: the module still works alone
            offset += n
        self.absmax = torch.cat([s.absmax for s in states], dim=1).contiguous()  # [K / blocksize, N] bf16
        biases = [m.bias for m in modules]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach().float() if b is not None else torch.zeros(n) for b, n in zip(biases, self.out_features)])
        self.extra_bytes = self.absmax.numel() * self.absmax.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [M, K] -> [M, N], computed in bf16 as bitsandbytes does, returned in x.dtype
        xb = x.to(torch.bfloat16)
        if torch.compiler.is_compiling():
            out = nf4_fused_linear(xb, self.weight, self.absmax, self.blocksize)
        else:
            out = _nf4_fused_linear(self.fn, xb, self.weight, self.absmax, self.blocksize)
        out = out.to(x.dtype)
        if self.bias is not None:
            out += self.bias.to(x.dtype)
        return out


def _nf4_fused_linear(fn, xb: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """xb [M, K] bf16, weight [N, K/2] packed, absmax [K / blocksize, N] bf16 -> [M, N] bf16."""
    if not xb.is_contiguous():
        xb = xb.contiguous()
    M, K, N = xb.shape[0], xb.shape[1], weight.shape[0]
    out = torch.empty(M, N, dtype=torch.bfloat16)
    fn(
        ctypes.c_int64(M),
        ctypes.c_int64(N),
        ctypes.c_int64(K),
        ctypes.c_void_p(xb.data_ptr()),
        ctypes.c_void_p(weight.data_ptr()),
        ctypes.c_void_p(absmax.data_ptr()),
        ctypes.c_void_p(out.data_ptr()),
        ctypes.c_int64(blocksize),
        ctypes.c_int64(xb.stride(0)),
        ctypes.c_int64(out.stride(0)),
    )
    return out


# Traced by torch.compile as one opaque node (eager calls skip the custom-op dispatch).
@torch.library.custom_op("lorad::nf4_fused_linear", mutates_args=())
def nf4_fused_linear(xb: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    return _nf4_fused_linear(_fused_kernel(), xb, weight, absmax, blocksize)


@nf4_fused_linear.register_fake
def _(xb, weight, absmax, blocksize):
    return xb.new_empty(xb.shape[0], weight.shape[0])


def dequantized_weight(module, dtype: torch.dtype) -> torch.Tensor:
    """The module's weight [N, K] exactly as bitsandbytes' CPU fallback dequantizes it for an
    input of `dtype` on every forward (bitsandbytes.backends.default.ops._gemm_4bit_default_impl,
    reached through bnb.matmul_4bit), computed once."""
    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError("dequantized_weight: the weight is packed for the fused kernel; use FusedNF4")
    B = module.weight.data.view(-1, 1)
    with torch.inference_mode():
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            B, absmax_f32(state), state.blocksize, state.quant_type, state.shape, dtype)


def absmax_f32(state) -> torch.Tensor:
    """The per-block scales of a quant state as float32, un-nesting them as bitsandbytes' fallback does."""
    if not state.nested:
        return state.absmax
    if state.state2.blocksize != 256:
        raise NotImplementedError("nested quantization with state2.blocksize != 256")
    with torch.inference_mode():
        return torch.ops.bitsandbytes.dequantize_blockwise.default(
            state.absmax, state.state2.absmax, state.state2.code, 256, torch.float32) + state.offset


class DequantizedNF4:
    """y = concat_i(module_i(x)) for NF4 modules that bitsandbytes would dequantize on every call:
    one F.linear on their dequantized weights, concatenated once (bit-identical per column)."""

    route = "nf4-dequant"

    def __init__(self, modules: list, dtype: torch.dtype = torch.float32):
        for m in modules:
            compute = getattr(m, "compute_dtype", None)
            if compute not in (None, dtype):
                raise ValueError(f"DequantizedNF4: module computes in {compute}, not {dtype}")
        self.dtype = dtype
        self.weight = torch.cat([dequantized_weight(m, dtype) for m in modules])  # [N, K]
        self.out_features = tuple(m.out_features for m in modules)
        self.in_features = modules[0].in_features
        biases = [m.bias for m in modules]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach().to(dtype) if b is not None else torch.zeros(n, dtype=dtype)
             for b, n in zip(biases, self.out_features)])
        self.extra_bytes = self.weight.numel() * self.weight.element_size()

    @staticmethod
    def bytes_for(modules: list, dtype: torch.dtype = torch.float32) -> int:
        return sum(m.out_features * m.in_features for m in modules) * torch.finfo(dtype).bits // 8

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [M, K] in self.dtype -> [M, N]
        return F.linear(x, self.weight, self.bias)


class KernelNF4:
    """y = concat_i(module_i(x)) for NF4 modules on bitsandbytes' dequantizing route (AVX2 CPUs):
    lorad's NF4 kernel (lorad.kernels.nf4_avx2) on the packed weights for batches of at most
    `max_rows` rows, `wide` (the group's DequantizedNF4 copy) above; wide=None: the kernel for
    every batch.

    The kernel reads the 4-bit weights (1/8 of an fp32 copy's bytes) and decodes them in
    registers; its sums run in another order than bitsandbytes' (equal to float32 rounding, not
    bit-identical). Like FusedNF4, the packed weights are concatenated along N once and each
    module's weight becomes a view into the concatenation; the scales are un-nested into fp32
    (1/8 of the packed bytes).
    """

    def __init__(self, modules: list, wide: DequantizedNF4 | None, max_rows: int | None):
        states = [m.weight.quant_state for m in modules]
        self.in_features = states[0].shape[1]
        if any(s.shape[1] != self.in_features or s.blocksize != BLOCK for s in states) or self.in_features % BLOCK:
            raise ValueError(f"KernelNF4: the modules must share in_features, a multiple of {BLOCK}, "
                             f"and blocksize {BLOCK}")
        self.code = states[0].code.float().contiguous()
        if any(not torch.equal(s.code.float(), self.code) for s in states):
            raise ValueError("KernelNF4: the modules must share one NF4 code table")
        self.out_features = tuple(s.shape[0] for s in states)
        self.weight = torch.cat([m.weight.data.reshape(-1) for m in modules])  # [N * K / 2] uint8
        offset = 0
        for m in modules:
            size = m.weight.data.numel()
            m.weight.data = self.weight[offset : offset + size].view(m.weight.data.shape)  # a view: no byte twice
            offset += size
        self.absmax = torch.cat([absmax_f32(s).float().reshape(-1) for s in states])  # [N * K / 64]
        biases = [m.bias for m in modules]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach().float() if b is not None else torch.zeros(n) for b, n in zip(biases, self.out_features)])
        self.wide = wide
        self.max_rows = max_rows
        self.route = "nf4-kernel" if wide is not None else "nf4-kernel-all"
        self.extra_bytes = self.absmax.numel() * 4 + (wide.extra_bytes if wide is not None else 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [M, K] float32 -> [M, N]
        if self.wide is not None and x.shape[0] > self.max_rows:
            return self.wide(x)
        if x.stride(-1) != 1:
            x = x.contiguous()
        if torch.compiler.is_compiling():
            out = nf4_kernel_linear(x, self.weight, self.absmax, self.code)
        else:
            out = nf4_matmul(x, self.weight, self.absmax, self.code)
        if self.bias is not None:
            out += self.bias
        return out


@torch.library.custom_op("lorad::nf4_kernel_linear", mutates_args=())
def nf4_kernel_linear(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    return nf4_matmul(x, weight, absmax, code)


@nf4_kernel_linear.register_fake
def _(x, weight, absmax, code):
    return x.new_empty(x.shape[0], 2 * weight.numel() // x.shape[1])
