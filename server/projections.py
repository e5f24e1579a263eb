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
  nf4-kernel   the same CPUs, batches of at most EngineConfig.nf4_kernel_rows rows: lorad's
               NF4 AVX2 kernel on the packed weights (lorad.server.nf4_cpu.KernelNF4), larger
               batches through the group's nf4-dequant copy; past the copies' budget
               (nf4-kernel-all) the kernel at every batch size. Equal to float32 rounding,
               not bit for bit
  modules      anything else (NF4 on CUDA, a layer past the dequant budget where the kernel
               cannot run): each module called as it is, the outputs concatenated

Every route but nf4-kernel(-all) returns exactly what calling the modules one by one returns (bit
for bit on the CPU routes; tests/test_nf4_cpu.py); only the number of calls changes.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from lorad.cpu_features import CpuFeatures
from lorad.kernels import nf4_avx2
from lorad.server.nf4_cpu import DequantizedNF4, FusedNF4, KernelNF4, nf4_route

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

    def __init__(self, dequant_memory: int, compute_dtype: torch.dtype, nf4_kernel_rows: int):
        self.dequant_left = dequant_memory
        self.compute_dtype = compute_dtype
        self.nf4_kernel_rows = nf4_kernel_rows
        self.routes: dict[str, int] = {}
        self.extra_bytes = 0
        self.past_budget = 0  # NF4 groups left on bitsandbytes' per-call path by the budget
        self.kernel_unavailable = False

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
            kernel = bool(self.nf4_kernel_rows) and self._kernel_fits(modules)
            need = DequantizedNF4.bytes_for(modules, torch.float32)
            if need <= self.dequant_left:
                self.dequant_left -= need
                copy = DequantizedNF4(modules, torch.float32)
                return KernelNF4(modules, copy, self.nf4_kernel_rows) if kernel else copy
            if kernel:  # past the copies' budget the kernel beats bitsandbytes' per-call dequantization at any size
                return KernelNF4(modules, None, None)
            if not self.past_budget:
                log.warning("dequant_memory is spent: the remaining NF4 projections dequantize on every call "
                            "(slow on this CPU; raise --dequant-memory)")
            self.past_budget += 1
        return ModuleGroup(modules)

    def _kernel_fits(self, modules: list) -> bool:
        if not nf4_avx2.available():
            if not self.kernel_unavailable:
                log.warning("NF4 kernel unavailable (%s): NF4 projections use fp32 copies at every batch size",
                            nf4_avx2.unavailable_reason())
            self.kernel_unavailable = True
            return False
        return all(m.weight.quant_state.blocksize == nf4_avx2.BLOCK and m.in_features % nf4_avx2.BLOCK == 0
                   for m in modules)

    def describe(self) -> str:
        names = {
            "dense": "unquantized, groups concatenated",
            "nf4-fused": "NF4 through bitsandbytes' fused AVX512-BF16 kernel, called directly",
            "nf4-dequant": "NF4 dequantized once to fp32 (bit-identical to bitsandbytes' fallback)",
            "nf4-kernel": f"NF4 through lorad's AVX2 kernel up to {self.nf4_kernel_rows} rows, fp32 copies above",
            "nf4-kernel-all": "NF4 through lorad's AVX2 kernel at every batch size",
            "modules": "each module's own forward",
        }
        parts = [f"{names[r]} ({n} groups)" for r, n in sorted(self.routes.items())]
        if self.past_budget:
            parts.append(f"{self.past_budget} NF4 groups past --dequant-memory")
        if self.extra_bytes:
            parts.append(f"{self.extra_bytes / 2**20:.0f} MiB of copies")
        return "; ".join(parts)


def _onednn_packed(weight: torch.Tensor):
    """weight [N, K] reordered once into oneDNN's blocked layout for _linear_pointwise, or None
    where this torch build has no such op. Its matmul is oneDNN's inner product: for the head
    at batch 2-16 ~2x faster than F.linear's MKL GEMM in fp32 and ~1.5x in bf16, and
    bit-identical to F.linear in bf16 (measured on SmolLM2's head, AVX512 and AVX2)."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
        torch.ops.mkldnn._linear_pointwise(weight.new_zeros(1, weight.shape[1]), packed, None, "none", [], "")
        return packed
    except (AttributeError, RuntimeError):
        return None


class LogitsHead:
    """lm_head over the rows that sample: [B, hidden] -> [B, vocab] float32.

    On the CPU the head's weights (113 MB in fp32 for SmolLM2, the largest read of a decode
    step) are reordered once for oneDNN's inner product, and for an NF4 base read at the 16-bit
    precision its projections already work at:
      * NF4 base, CPU with native bf16 (AVX512-BF16, AMX): a packed bf16 copy;
      * NF4 base elsewhere (AVX2): an fp16 copy for one row, read by torch's fp16 GEMV ~4x
        faster than MKL's fp32 GEMV reads fp32 (F16C, every AVX2 CPU has it), and a packed
        fp32 copy for several rows (fp16 GEMMs have no fast CPU kernel);
      * unquantized base: a packed fp32 copy (the same products, another summation order).
    A 16-bit pass alone moves logits by up to ~0.1 (bf16 rounds the logits themselves), enough
    to flip near-ties: tests/test_oracle.py caught 3 of 8 greedy rows changing. So the REFINE
    best tokens of every row are recomputed in fp32 from the fp32 weights: greedy decoding and
    the log-probabilities of likely tokens are the fp32 head's up to summation order; only
    tokens outside each row's top REFINE keep 16-bit logits. CUDA bases use the module as is.
    """

    REFINE = 64

    def __init__(self, lm_head, quantized: bool, cpu: CpuFeatures, device: torch.device):
        self.module = lm_head
        self.packed = self.single = None
        self.dtype = lm_head.weight.dtype  # of the packed copy
        if device.type == "cpu" and lm_head.bias is None and lm_head.weight.dtype == torch.float32:
            weight = lm_head.weight.detach()
            self.dtype = torch.bfloat16 if quantized and cpu.native_bf16 else torch.float32
            self.packed = _onednn_packed(weight.to(self.dtype).contiguous())  # [V, H], blocked
            if quantized and not cpu.native_bf16:
                self.single = weight.to(torch.float16).contiguous()  # [V, H]
        per_element = (torch.finfo(self.dtype).bits // 8 if self.packed is not None else 0) + (
            2 if self.single is not None else 0)
        self.extra_bytes = lm_head.weight.numel() * per_element

    @property
    def route(self) -> str:
        if self.packed is None and self.single is None:
            return f"lm_head {str(self.module.weight.dtype).removeprefix('torch.')}"
        parts = []
        if self.single is not None:
            parts.append(f"fp16 for one row (top {self.REFINE} refined in fp32)")
        if self.packed is not None:
            name = str(self.dtype).removeprefix("torch.")
            refined = f", top {self.REFINE} refined in fp32" if self.dtype != torch.float32 else ""
            parts.append(f"oneDNN-packed {name}{refined}" + (" for several" if self.single is not None else ""))
        return "lm_head " + ", ".join(parts)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.single is not None and h.shape[0] == 1:
            return self._refine(F.linear(h.to(torch.float16), self.single).float(), h)
        if self.packed is None:
            return self.module(h.to(self.module.weight.dtype)).float()
        logits = torch.ops.mkldnn._linear_pointwise(h.to(self.dtype), self.packed, None, "none", [], "").float()
        return logits if self.dtype == torch.float32 else self._refine(logits, h)

    def _refine(self, logits: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """logits [B, V] float32 from a 16-bit pass; their top REFINE per row recomputed in fp32."""
        top = logits.topk(self.REFINE, dim=-1, sorted=False).indices  # [B, k]
        rows = self.module.weight.index_select(0, top.view(-1)).view(*top.shape, -1)  # [B, k, H] fp32
        exact = torch.bmm(rows, h.float()[:, :, None])[:, :, 0]  # [B, k]
        return logits.scatter_(1, top, exact)
