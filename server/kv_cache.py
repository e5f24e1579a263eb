"""The KV cache: one preallocated block of rows, one row per running request.

Layout per layer: k, v [rows, kv_heads, max_seq_len, head_dim], the layout SDPA reads. The
whole cache is allocated once (by default for max_batch_size rows of max_seq_len tokens); a
step only writes into it. Live rows are kept compacted in [0, n_rows): when a request leaves,
the last live row moves into its place (a copy of that row's filled prefix), so decode
attention reads a view of the first n_rows.

On the CPU the cache is anonymous memory that the kernel zero-fills page by page on first
touch (server/zero_pages.py): a cache sized for 32 rows of 2048 tokens (3 GB for SmolLM2)
holds resident only the pages that requests have written.
"""

from __future__ import annotations

import torch

from lorad.errors import ConfigError
from lorad.geometry import ModelGeometry

from lorad.server.zero_pages import ZeroPages


def rows_for_budget(geometry: ModelGeometry, max_seq_len: int, dtype: torch.dtype, budget_bytes: int) -> int:
    row_bytes = geometry.kv_bytes_per_token(torch.finfo(dtype).bits // 8) * max_seq_len
    return budget_bytes // row_bytes


class KVCache:
    def __init__(self, geometry: ModelGeometry, rows: int, max_seq_len: int, dtype: torch.dtype, device: torch.device):
        if rows < 1:
            raise ConfigError("kv cache: the budget does not hold even one sequence of max_seq_len tokens")
        self.rows = rows
        self.max_seq_len = max_seq_len
        self.dtype = dtype
        self.device = device
        shape = (geometry.num_layers, rows, geometry.num_kv_heads, max_seq_len, geometry.head_dim)
        # zeros, not empty: masked keys still meet their values in the attention product,
        # and uninitialized memory could hold NaN.
        self._memory = ZeroPages()  # on the CPU: resident only where written
        self.k = self._memory.zeros(shape, dtype, device)
        self.v = self._memory.zeros(shape, dtype, device)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row src into row dst (all layers)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def clear_span(self, row: int, start: int, end: int) -> None:
        """Zero positions [start, end) of a row (all layers); nothing when end <= start."""
        if end > start:
            self.k[:, row, :, start:end].zero_()
            self.v[:, row, :, start:end].zero_()

    def clear_row(self, row: int) -> None:
        self.k[:, row].zero_()
        self.v[:, row].zero_()
