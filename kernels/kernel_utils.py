"""Shared `@triton.jit` helpers and launch configurations of the multi-adapter LoRA kernels.

Both kernels walk the batch the same way (vLLM V1's lora_shrink / lora_expand, after Punica's
SGMV): tokens are grouped by slot in `meta.sorted_token_ids`, the grid's last axis runs over
the active adapters, and a program owns one BLOCK_M tile of one adapter's segment. One kernel
serves prefill (long segments, several M tiles per adapter) and decode (segments of one
token, where the tile is a gather of a single row): no separate BGMV kernel is needed, the
masked rows cost no memory traffic.

Importing this module imports triton: only lora_ops_triton does, and only the dispatcher's
triton branch imports that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def segment_tile(sorted_token_ids_ptr, active_slots_ptr, seg_starts_ptr, pid_m, pid_d, BLOCK_M: tl.constexpr):
    """Rows of tile `pid_m` of adapter `pid_d`'s segment.

    Returns (slot, rows, row_mask, live): slot as int64; rows [BLOCK_M] int64 token indices
    (0 where masked); live is False when the program has nothing to do (slot -1, or the tile
    starts past the end of the segment), and the caller returns at once.
    """
    slot = tl.load(active_slots_ptr + pid_d).to(tl.int64)
    seg_lo = tl.load(seg_starts_ptr + pid_d)
    seg_hi = tl.load(seg_starts_ptr + pid_d + 1)
    m_lo = seg_lo + pid_m * BLOCK_M
    live = (slot >= 0) & (m_lo < seg_hi)
    offs = m_lo + tl.arange(0, BLOCK_M)
    row_mask = offs < seg_hi
    rows = tl.load(sorted_token_ids_ptr + offs, mask=row_mask, other=0).to(tl.int64)
    return slot, rows, row_mask, live


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes of one launch. tl.dot needs block_m, block_n, block_k >= 16."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1  # shrink only: K is split over this many programs, summed with atomics
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"LaunchConfig.{name} must be a power of two >= 16, got {value}")
        if self.split_k < 1:
            raise ValueError(f"LaunchConfig.split_k must be >= 1, got {self.split_k}")


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


# Defaults, not tuned on a GPU (none was lent to this project): they follow vLLM's untuned
# defaults (small M tiles, long K tiles and split-K for the shrink in decode). On CPU the
# interpreter runs programs one after another in Python, so there the fewest, largest tiles
# are fastest; the tests force small tiles separately to cover the loops and split-K.
def shrink_config(max_seg_len: int, num_active: int, h_in: int, rank: int, device: torch.device) -> LaunchConfig:
    block_m = _pow2(max_seg_len, 16, 64)
    block_n = _pow2(rank, 16, 64)
    if device.type != "cuda":
        return LaunchConfig(block_m, block_n, _pow2(h_in, 16, 1024))
    block_k = 256 if max_seg_len <= 16 else 64
    programs = triton.cdiv(max_seg_len, block_m) * triton.cdiv(rank, block_n) * num_active
    k_tiles = triton.cdiv(h_in, block_k)
    split_k = 1
    while programs * split_k < 256 and split_k * 2 <= k_tiles and split_k < 32:
        split_k *= 2  # small batches: spread the K reduction over the SMs
    return LaunchConfig(block_m, block_n, block_k, split_k=split_k)


def expand_config(max_seg_len: int, h_out: int, rank: int, device: torch.device) -> LaunchConfig:
    block_m = _pow2(max_seg_len, 16, 64)
    block_k = _pow2(rank, 16, 64)
    if device.type != "cuda":
        return LaunchConfig(block_m, _pow2(h_out, 16, 1024), block_k)
    return LaunchConfig(block_m, 128, block_k)
