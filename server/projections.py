"""A layer's projections grouped by shared input, and the logits head: how each one runs.

q/k/v read the same normalized hidden state, and so do gate/up. Each group runs as ONE matmul
whose output [T, sum of out_features] the runner splits into column views; o and down are
groups of one. How a group runs depends on the base and the CPU (lorad.cpu_features):

  dense        an unquantized base: the group's weights concatenated once (each module's
               parameter becomes a view of the concatenation: no byte held twice), one F.linear
  nf4-fused    NF4 where bitsandbytes has its fused AVX512-BF16 CPU kernel: that kernel, called
               directly on the concatenated packed weights (lorad.server.nf4_cpu.FusedNF4)
  nf4-dequant  NF4 where bitsandbytes would dequantize every weight on every call (AVX2 CPUs):
               a dequantized fp32 copy made once, within EngineConfig.dequant_memory,
               bit-identical to bitsandbytes' own fallback (lorad.server.nf4_cpu.DequantizedNF4)
  modules      anything else (NF4 on CUDA, a layer past the dequant budget): each module
               called as it is, the outputs concatenated

Every route returns exactly what calling the modules one by one returns (bit for bit on the
CPU routes; tests/test_nf4_cpu.py); only the number of calls changes.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from lorad.cpu_features import CpuFeatures
from lorad.server.nf4_cpu import DequantizedNF4, FusedNF4, nf4_route

log = logging.getLogger(__name__)


class DenseGroup:
    route = "dense"

    def __init__(self, modules: list):
        self.out_features = tuple(m.out_features for m in modules)
        with torch.no_grad():
            self.weight = torch.cat([m.weight.detach() for m in modules])  # [N, K]
            offset = 0
            for m, n in zip(modules, self.out_features):
                m.weight.data = self.weight[offset : offset + n]  # the module now reads the concatenation
                offset += n
        biases = [m.bias for m in modules]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else self.weight.new_zeros(n) for b, n in zip(biases, self.out_features)])
        self.extra_bytes = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ModuleGroup:
    route = "modules"

    def __init__(self, modules: list):
        self.modules = modules
        self.out_features = tuple(m.out_features for m in modules)
        self.extra_bytes = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.modules) == 1:
            return self.modules[0](x)
        return torch.cat([m(x) for m in self.modules], dim=-1)


def _is_dense_linear(module) -> bool:
    return type(module) is torch.nn.Linear


class GroupBuilder:
    """Builds every group of one model, tracking the dequantization budget across them."""

    def __init__(self, dequant_memory: int, compute_dtype: torch.dtype):
        self.dequant_left = dequant_memory
        self.compute_dtype = compute_dtype
        self.routes: dict[str, int] = {}
        self.extra_bytes = 0

    def build(self, modules: list):
        group = self._choose(modules)
        self.routes[group.route] = self.routes.get(group.route, 0) + 1
        self.extra_bytes += group.extra_bytes
        return group

    def _choose(self, modules: list):
        if all(_is_dense_linear(m) for m in modules) and len({m.weight.device for m in modules}) == 1:
            return DenseGroup(modules)
        routes = {nf4_route(m) for m in modules}
        if routes == {"fused"}:
            return FusedNF4(modules)
        if routes == {"dequant"} and self.compute_dtype == torch.float32:
            need = DequantizedNF4.bytes_for(modules, torch.float32)
            if need <= self.dequant_left:
                self.dequant_left -= need
                return DequantizedNF4(modules, torch.float32)
        return ModuleGroup(modules)

    def describe(self) -> str:
        names = {
            "dense": "unquantized, groups concatenated",
            "nf4-fused": "NF4 through bitsandbytes' fused AVX512-BF16 kernel, called directly",
            "nf4-dequant": "NF4 dequantized once to fp32 (bit-identical to bitsandbytes' fallback)",
            "modules": "each module's own forward",
        }
        parts = [f"{names[r]} ({n} groups)" for r, n in sorted(self.routes.items())]
        if self.extra_bytes:
            parts.append(f"{self.extra_bytes / 2**20:.0f} MiB of copies")
        return "; ".join(parts)


class LogitsHead:
    """lm_head over the rows that sample: [B, hidden] -> [B, vocab] float32.

    An unquantized base, and every CUDA base, runs the module as it is (the fp32 oracle stays
    exact). For an NF4 base on the CPU the head's weights, 113 MB in fp32 for SmolLM2 and the
    largest read of a decode step, are first read from a 16-bit copy:
      * bf16 on a CPU with native bf16 (AVX512-BF16, AMX): oneDNN's bf16 GEMM, ~2.5x faster
        than fp32 at batch 16 and ~3x at batch 1;
      * fp16 elsewhere, for one row only: torch's fp16 GEMV reads it ~4x faster than MKL's
        fp32 GEMV (F16C, every AVX2 CPU has it); fp16 GEMMs have no fast CPU kernel, so
        several rows take the fp32 module.
    A 16-bit pass alone moves logits by up to ~0.1 (bf16 rounds the logits themselves), enough
    to flip near-ties: tests/test_oracle.py caught 3 of 8 greedy rows changing. So the REFINE
    best tokens of every row are recomputed in fp32 from the fp32 weights: greedy decoding
    and the reported log-probabilities of likely tokens are the fp32 head's up to summation
    order, and only tokens outside each row's top REFINE keep 16-bit logits.
    """

    REFINE = 64

    def __init__(self, lm_head, quantized: bool, cpu: CpuFeatures, device: torch.device):
        self.module = lm_head
        self.copy = None  # [V, H] 16-bit
        if quantized and device.type == "cpu" and lm_head.bias is None and lm_head.weight.dtype == torch.float32:
            self.copy = lm_head.weight.detach().to(torch.bfloat16 if cpu.native_bf16 else torch.float16).contiguous()
        self.extra_bytes = 0 if self.copy is None else self.copy.numel() * self.copy.element_size()

    @property
    def route(self) -> str:
        if self.copy is None:
            return f"lm_head {str(self.module.weight.dtype).removeprefix('torch.')}"
        if self.copy.dtype == torch.bfloat16:
            return f"lm_head bf16, top {self.REFINE} refined in fp32"
        return f"lm_head fp16 for one row (top {self.REFINE} refined in fp32), fp32 for several"

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.copy is None or (self.copy.dtype == torch.float16 and h.shape[0] != 1):
            return self.module(h.to(self.module.weight.dtype)).float()
        logits = F.linear(h.to(self.copy.dtype), self.copy).float()  # [B, V]
        top = logits.topk(self.REFINE, dim=-1, sorted=False).indices  # [B, k]
        rows = self.module.weight.index_select(0, top.view(-1)).view(*top.shape, -1)  # [B, k, H] fp32
        exact = torch.bmm(rows, h.float()[:, :, None])[:, :, 0]  # [B, k]
        return logits.scatter_(1, top, exact)
