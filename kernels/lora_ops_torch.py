"""Pure-PyTorch multi-adapter LoRA ops: the CPU path and the test oracle of the Triton kernels.

Same signatures and semantics as `lorad.kernels.lora_shrink` / `lora_expand` (see there for the
contract). Two strategies, picked per batch from the metadata:

* padded batched matmul: one `bmm` over a [n_range, max_seg_len, H] view of the tokens grouped
  by slot. On CPU this wins whenever segments are about equally long (decode: one token per
  request), because its cost is three torch calls per projection whatever the number of
  adapters. When the engine lays tokens out grouped by slot with equal segments, every tensor
  it touches is a view.
* per-segment matmul: one `mm` per active adapter. Wins when segments are long and uneven
  (prefill of prompts of different lengths), where padding would waste work.

A gather of each token's adapter weights (`bmm(x[:, None], lora_a[slots])`) is never the
fastest on CPU: it copies R x H weights per token (benchmarks/bench_lora_cpu.py).
"""

from __future__ import annotations

import torch

from lorad.kernels.checks import check_expand_args, check_shrink_args
from lorad.kernels.metadata import LoRABatchMeta

# Use the padded bmm while the padded table is at most this many times the real token count.
PAD_WASTE_LIMIT = 2.0


def use_padded(meta: LoRABatchMeta) -> bool:
    return meta.padded_size <= PAD_WASTE_LIMIT * meta.num_lora_tokens


def lora_shrink_torch(
    x: torch.Tensor,  # [T, H_in]
    lora_a: torch.Tensor,  # [S, R, H_in]
    meta: LoRABatchMeta,
    out: torch.Tensor | None = None,  # [T, R] float32
) -> torch.Tensor:
    check_shrink_args(x, lora_a, meta, out)
    T, R = x.shape[0], lora_a.shape[1]
    v = out if out is not None else torch.empty(T, R, dtype=torch.float32, device=x.device)
    if meta.no_lora:
        return v
    if use_padded(meta):
        _shrink_padded(x, lora_a, meta, v)
    else:
        _shrink_segments(x, lora_a, meta, v)
    return v


def lora_expand_torch(
    y: torch.Tensor,  # [T, H_out], modified in place
    v: torch.Tensor,  # [T, R] float32
    lora_b: torch.Tensor,  # [S, R, H_out]
    scale: torch.Tensor,  # [S] float32
    meta: LoRABatchMeta,
) -> None:
    check_expand_args(y, v, lora_b, scale, meta)
    if meta.no_lora:
        return
    if use_padded(meta):
        _expand_padded(y, v, lora_b, scale, meta)
    else:
        _expand_segments(y, v, lora_b, scale, meta)


# --- padded batched matmul ------------------------------------------------------------------


def _shrink_padded(x, lora_a, meta, v) -> None:
    n, L, P = meta.n_range, meta.max_seg_len, meta.padded_size
    H_in, R = x.shape[1], lora_a.shape[1]
    a_t = lora_a[meta.slot_lo : meta.slot_lo + n].transpose(1, 2)  # [n, H_in, R] view
    if meta.pad_identity:
        p0 = meta.pad_first
        xs = x[p0 : p0 + P].view(n, L, H_in)
        if x.dtype == torch.float32:
            torch.bmm(xs, a_t, out=v[p0 : p0 + P].view(n, L, R))
        else:
            v[p0 : p0 + P] = torch.bmm(xs, a_t).view(P, R)
        return
    xs = x.index_select(0, meta.pad_rows).view(n, L, H_in)  # [n, L, H_in], pads hold row 0
    vp = torch.bmm(xs, a_t).view(P, R)  # [P, R]
    v.index_copy_(0, meta.sorted_token_ids.long(), vp.index_select(0, meta.pad_valid_pos).float())


def _expand_padded(y, v, lora_b, scale, meta) -> None:
    n, L, P = meta.n_range, meta.max_seg_len, meta.padded_size
    H_out, R = y.shape[1], v.shape[1]
    b = lora_b[meta.slot_lo : meta.slot_lo + n]  # [n, R, H_out] view
    s = scale[meta.slot_lo : meta.slot_lo + n].view(n, 1, 1)
    if meta.pad_identity:
        p0 = meta.pad_first
        vs = (v[p0 : p0 + P].view(n, L, R) * s).to(y.dtype)  # [n, L, R]
        y[p0 : p0 + P].view(n, L, H_out).baddbmm_(vs, b)
        return
    # Pads read token row 0 and are zeroed by pad_valid, so index_add_ adds 0.0 to row 0.
    vs = (v.index_select(0, meta.pad_rows).view(n, L, R) * (s * meta.pad_valid)).to(y.dtype)
    y.index_add_(0, meta.pad_rows, torch.bmm(vs, b).view(P, H_out))


# --- per-segment matmul ---------------------------------------------------------------------


def _segments(meta: LoRABatchMeta):
    """Yield (slot, rows): rows is a slice when tokens are grouped contiguously, else an index."""
    starts = meta.seg_starts_host
    first = int(meta.sorted_token_ids[0]) if meta.grouped_contiguous else 0
    for d, slot in enumerate(meta.active_slots_host):
        a, b = starts[d], starts[d + 1]
        if meta.grouped_contiguous:
            yield slot, slice(first + a, first + b)
        else:
            yield slot, meta.sorted_token_ids[a:b].long()


def _shrink_segments(x, lora_a, meta, v) -> None:
    for slot, rows in _segments(meta):
        if isinstance(rows, slice):
            if x.dtype == torch.float32:
                torch.mm(x[rows], lora_a[slot].t(), out=v[rows])
            else:
                v[rows] = x[rows] @ lora_a[slot].t()
        else:
            v.index_copy_(0, rows, (x.index_select(0, rows) @ lora_a[slot].t()).float())


def _expand_segments(y, v, lora_b, scale, meta) -> None:
    scales = scale.tolist()
    for slot, rows in _segments(meta):
        if isinstance(rows, slice):
            y[rows].addmm_(v[rows].to(y.dtype), lora_b[slot], alpha=scales[slot])
        else:
            delta = v.index_select(0, rows).to(y.dtype) @ lora_b[slot]  # [n, H_out]
            y.index_add_(0, rows, delta, alpha=scales[slot])
