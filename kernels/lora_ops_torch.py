"""Pure-PyTorch multi-adapter LoRA ops: the CPU path and the test oracle of the Triton kernels.

Same signatures and semantics as `lorad.kernels.lora_shrink` / `lora_expand` (see there for the
contract). Two strategies, picked per batch from the metadata:

* padded batched matmul: one `bmm` over a [n_range, max_seg_len, H] view of the tokens grouped
  by slot. On CPU this wins whenever segments are about equally long, and in decode batches
  of many adapters even when they are not (use_padded): its cost is a handful of torch calls
  per projection whatever the number of adapters. When the engine lays tokens out grouped by
  slot with equal segments, every tensor it touches is a view.
* per-segment matmul: one `mm` per active adapter. Wins when segments are long and uneven
  (prefill of prompts of different lengths), where padding and gathers would waste work.

A gather of each token's adapter weights (`bmm(x[:, None], lora_a[slots])`) is never the
fastest on CPU: it copies R x H weights per token (benchmarks/bench_lora_cpu.py).
"""

from __future__ import annotations

import torch

from lorad.kernels.checks import check_add_lora_args, check_dora_scale, check_expand_args, check_shrink_args
from lorad.kernels.metadata import LoRABatchMeta

# The strategy is picked by a cost model counted in token rows (one token through one
# shrink + expand pair):
#   each per-segment matmul pair costs about SEGMENT_ROWS rows of Python and dispatch overhead;
#   a row reached through a gather (index_select in, index_add / index_copy out) costs
#   1 + GATHER_COST rows.
# Fitted on benchmarks/bench_lora_cpu.py's sweep (SmolLM2 shapes, rank 16, 1-16 adapters,
# 1-256 tokens, 35 batch shapes; kernels/README.md): over three runs on a noisy shared machine
# the sum of log slowdowns against the faster strategy is 1.6, worst row 1.9x. The single limit
# it replaces (padded while padded_size <= 2 x tokens) scored 4.6, worst row 2.7x: it sent
# decode batches of many adapters with waste above 2 to a dozen tiny matmuls, and long
# zipf-shaped prefill batches to a padded bmm twice the work.
SEGMENT_ROWS = 12.0
GATHER_COST = 0.25
# add_lora's decode layout computes the shrink as A @ x^T when every adapter has at most
# FEW_TOKENS tokens and there are at least MANY_ADAPTERS of them (see add_lora_torch).
FEW_TOKENS = 4
MANY_ADAPTERS = 4


def use_padded(meta: LoRABatchMeta) -> bool:
    if meta.pad_identity:  # equal segments in place: one bmm on views, nothing to beat
        return True
    padded = meta.padded_size * (1 + GATHER_COST)
    segments = meta.num_lora_tokens * (1 + (0 if meta.grouped_contiguous else GATHER_COST))
    return padded <= segments + SEGMENT_ROWS * meta.num_active


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


def add_lora_torch(
    y: torch.Tensor,  # [T, H_out], modified in place
    x: torch.Tensor,  # [T, H_in]
    lora_a: torch.Tensor,  # [S, R, H_in]
    lora_b: torch.Tensor,  # [S, R, H_out]
    scale: torch.Tensor,  # [S] float32
    meta: LoRABatchMeta,
) -> None:
    """lora_shrink then lora_expand; see lorad.kernels.add_lora."""
    check_add_lora_args(y, x, lora_a, lora_b, scale, meta)
    if meta.no_lora:
        return
    if meta.pad_identity and x.dtype == torch.float32 and y.dtype == torch.float32:
        # Tokens grouped by slot in equal segments (decode): [n, L, H] views; bmm, scale, baddbmm.
        n, L, P, p0 = meta.n_range, meta.max_seg_len, meta.padded_size, meta.pad_first
        xs = _rows(x, p0, P).view(n, L, x.shape[1])
        a = _rows(lora_a, meta.slot_lo, n)  # [n, R, H_in]
        if L <= FEW_TOKENS and n >= MANY_ADAPTERS:
            # A as the left operand: with a few tokens per adapter and the adapters' weights far
            # larger than the caches, MKL's batched kernel streams A ~20% faster this way round
            # (benchmarks/bench_lora_cpu.py; ~1.5x slower with 2 adapters x 8 tokens).
            vs = torch.bmm(a, xs.transpose(1, 2)).transpose(1, 2)  # [n, L, R] fp32 (a view)
        else:
            vs = torch.bmm(xs, a.transpose(1, 2))  # [n, L, R] fp32
        vs.mul_(_rows(scale, meta.slot_lo, n).view(n, 1, 1))
        ys, b = _rows(y, p0, P).view(n, L, y.shape[1]), _rows(lora_b, meta.slot_lo, n)
        if y.is_contiguous():
            ys.baddbmm_(vs, b)
        else:
            # y is a column slice of a grouped projection's output (q/k/v, gate/up): CPU baddbmm_ into
            # a strided output loops over the batch with one addmm_ per adapter; one bmm into a
            # contiguous [n, L, H_out] and an add is ~15% faster (43 -> 37 us for 8 adapters x 2 tokens at
            # SmolLM2's q shape; the W16 step's LoRA 21.3 -> 19.8 ms in benchmarks/profile_step.py).
            ys.add_(torch.bmm(vs, b))
        return
    v = lora_shrink_torch(x, lora_a, meta)
    lora_expand_torch(y, v, lora_b, scale, meta)


def lora_expand_dora_torch(
    y: torch.Tensor,  # [T, H_out], modified in place
    v: torch.Tensor,  # [T, R] float32
    lora_b: torch.Tensor,  # [S, R, H_out]
    scale: torch.Tensor,  # [S] float32
    dora_scale: torch.Tensor,  # [S, H_out] float32
    meta: LoRABatchMeta,
) -> None:
    # One matmul per adapter: DoRA is the stretch path, written for clarity, not tuned.
    check_expand_args(y, v, lora_b, scale, meta)
    check_dora_scale(dora_scale, lora_b)
    if meta.no_lora:
        return
    scales = scale.tolist()
    for slot, rows in _segments(meta):
        delta = v[rows] @ lora_b[slot].float()  # [n, H_out] fp32
        y[rows] = (dora_scale[slot] * (y[rows].float() + scales[slot] * delta)).to(y.dtype)


# --- padded batched matmul ------------------------------------------------------------------


def _rows(t: torch.Tensor, first: int, n: int) -> torch.Tensor:
    """t[first : first + n]; t itself when that is all of it (a slice costs a microsecond or two,
    and the decode step calls these ops 200+ times)."""
    return t if first == 0 and n == t.shape[0] else t[first : first + n]


def _shrink_padded(x, lora_a, meta, v) -> None:
    n, L, P = meta.n_range, meta.max_seg_len, meta.padded_size
    H_in, R = x.shape[1], lora_a.shape[1]
    a_t = _rows(lora_a, meta.slot_lo, n).transpose(1, 2)  # [n, H_in, R] view
    if meta.pad_identity:
        p0 = meta.pad_first
        xs = _rows(x, p0, P).view(n, L, H_in)
        if x.dtype == torch.float32:
            torch.bmm(xs, a_t, out=_rows(v, p0, P).view(n, L, R))
        else:
            _rows(v, p0, P).copy_(torch.bmm(xs, a_t).view(P, R))
        return
    xs = x.index_select(0, meta.pad_rows).view(n, L, H_in)  # [n, L, H_in], pads repeat a LoRA row
    vp = torch.bmm(xs, a_t).view(P, R)  # [P, R]
    v.index_copy_(0, meta.sorted_rows, vp.index_select(0, meta.pad_valid_pos).float())


def _expand_padded(y, v, lora_b, scale, meta) -> None:
    n, L, P = meta.n_range, meta.max_seg_len, meta.padded_size
    H_out, R = y.shape[1], v.shape[1]
    b = _rows(lora_b, meta.slot_lo, n)  # [n, R, H_out] view
    s = _rows(scale, meta.slot_lo, n).view(n, 1, 1)
    if meta.pad_identity:
        p0 = meta.pad_first
        vs = _rows(v, p0, P).view(n, L, R) * s  # [n, L, R]
        if y.dtype != torch.float32:
            vs = vs.to(y.dtype)
        _rows(y, p0, P).view(n, L, H_out).baddbmm_(vs, b)
        return
    # Only real tokens' products reach y. A pad's product is 0 times its slot's B and scale,
    # which is NaN when that slot (in use or an unused one inside the range) holds a NaN or an
    # Inf; adding it to the row the pad read would hand one adapter's poison to another's token.
    vs = (v.index_select(0, meta.pad_rows).view(n, L, R) * s).to(y.dtype)
    y.index_add_(0, meta.sorted_rows, torch.bmm(vs, b).view(P, H_out).index_select(0, meta.pad_valid_pos))


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
            yield slot, meta.sorted_rows[a:b]


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
