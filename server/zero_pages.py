"""Zero-filled host tensors that take memory only where they are written.

The engine preallocates for the worst case: KV-cache rows for --max-batch-size requests of
--max-seq-len tokens, adapter slots of --max-lora-rank for --max-loras adapters. On the CPU
those tensors are anonymous memory, which the kernel maps to its shared zero page until a
page is first written: reading untouched parts costs nothing, and resident memory grows with
what requests and adapters actually use (rank-16 adapters in rank-64 slots make a quarter of
the slot pool resident). Elsewhere (CUDA) they are plain torch.zeros.
"""

from __future__ import annotations

import math
import mmap

import torch


class ZeroPages:
    """Allocates zero tensors and keeps their host buffers alive as long as itself."""

    def __init__(self):
        self._buffers: list[mmap.mmap] = []

    def zeros(self, shape: tuple, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        if torch.device(device).type != "cpu":
            return torch.zeros(shape, dtype=dtype, device=device)
        nbytes = math.prod(shape) * torch.finfo(dtype).bits // 8
        if nbytes == 0:
            return torch.zeros(shape, dtype=dtype)
        buffer = mmap.mmap(-1, nbytes)  # anonymous: zero pages, made resident on first write
        self._buffers.append(buffer)  # the tensor borrows the buffer
        return torch.frombuffer(buffer, dtype=dtype).view(shape)
