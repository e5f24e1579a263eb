"""Triton multi-adapter LoRA kernels: shrink (x @ A.T) and expand (y += scale * v @ B).

After Punica's SGMV (Chen et al., "Punica: Multi-Tenant LoRA Serving", 2023) as vLLM V1 lays
it out: tokens are grouped by adapter slot (`meta.sorted_token_ids`, `meta.seg_starts`), the
grid is (M tiles x N tiles [x K splits], active adapters), and each program computes one tile
of one adapter's segment with fp32 accumulation. The grid's M extent is the longest segment, so
a program whose tile lies past the end of its (shorter) segment exits at once: skewed batches
([1, T-1]) cost one wasted launch slot per empty tile, not a wrong read.

Same signatures and semantics as `lorad.kernels.lora_shrink` / `lora_expand`; the PyTorch twin
in lora_ops_torch.py is the reference. Each wrapper checks, allocates, launches.

Interpreter note (TRITON_INTERPRET=1, the only way these run on CPU): the interpreter's `tl.dot`
returns garbage for bf16 operands (fp32 and fp16 are right). The UPCAST constexpr casts both
operands to fp32 before every dot; the wrappers turn it on only for bf16 tensors on the CPU,
i.e. exactly when the interpreter runs a bf16 launch. On a GPU bf16 operands go to the tensor
cores as they are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorad.kernels.checks import check_dora_scale, check_expand_args, check_shrink_args
from lorad.kernels.kernel_utils import LaunchConfig, expand_config, segment_tile, shrink_config
from lorad.kernels.metadata import LoRABatchMeta


def _upcast_dot(t: torch.Tensor) -> bool:
    return t.dtype == torch.bfloat16 and t.device.type == "cpu"


def _dot_precision(t: torch.Tensor) -> str:
    # fp32 operands: full fp32 products ("ieee"), not TF32, so the result honours the contract
    # (fp32 accumulation of fp32 products) and matches torch's CUDA matmul, which does not use
    # TF32 by default. The LoRA ops are memory bound; TF32 would buy little.
    return "ieee" if t.dtype == torch.float32 or _upcast_dot(t) else "tf32"


# --------------------------------------------------------------------------------------------
# shrink: v[t, :] = x[t, :] @ lora_a[slot[t]].T
# --------------------------------------------------------------------------------------------


@triton.jit
def _lora_shrink_kernel(
    # Pointers
    x_ptr,  # [T, K]
    a_ptr,  # [S, R, K]
    v_ptr,  # [T, R] float32
    sorted_token_ids_ptr,  # [N] int32
    active_slots_ptr,  # [D] int32
    seg_starts_ptr,  # [D + 1] int32
    # Sizes
    K,  # H_in
    R,  # rank (slot width)
    # Strides (the innermost stride of every tensor is 1: the wrapper checks contiguity)
    stride_xt,
    stride_as,
    stride_ar,
    stride_vt,
    # Meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_mn = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_d = tl.program_id(2)
    num_n = tl.cdiv(R, BLOCK_N)
    pid_m = pid_mn // num_n
    pid_n = pid_mn % num_n

    slot, rows, row_mask, live = segment_tile(
        sorted_token_ids_ptr, active_slots_ptr, seg_starts_ptr, pid_m, pid_d, BLOCK_M
    )
    if not live:  # slot -1 or a tile past the end of a short segment
        return

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < R
    x_rows = x_ptr + rows[:, None] * stride_xt  # [BLOCK_M, 1]
    a_cols = a_ptr + slot * stride_as + offs_n[None, :] * stride_ar  # [1, BLOCK_N], A read as A.T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.load(a_cols + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            a = a.to(tl.float32)
        acc += tl.dot(x, a, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]

    v_tile = v_ptr + rows[:, None] * stride_vt + offs_n[None, :]
    v_mask = row_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(v_tile, acc, mask=v_mask)
    else:
        tl.atomic_add(v_tile, acc, mask=v_mask)  # v was zeroed by the wrapper


def lora_shrink_triton(
    x: torch.Tensor,  # [T, H_in]
    lora_a: torch.Tensor,  # [S, R, H_in]
    meta: LoRABatchMeta,
    out: torch.Tensor | None = None,  # [T, R] float32
    *,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """Triton `lora_shrink`; see lorad.kernels.lora_shrink for the contract.

    Semantics:
      for t in range(T):
          if meta.token_slots[t] != -1:
              v[t, :] = float32(x[t, :]) @ float32(lora_a[meta.token_slots[t]]).T
      # fp32 accumulation of the input dtype's products, stored unrounded for every input dtype

    Args:
      x: Shape `[T, H_in]`. lora_a: Shape `[S, R, H_in]`, x's dtype. meta: from build_lora_meta,
      its tensors on x's device. out: optional `[T, R]` float32, overwritten on the rows whose
      slot is not -1 (with split-K it is zeroed first, every row).
      config: tile sizes (tests force small tiles); default from kernel_utils.shrink_config.

    Returns:
      v: Shape `[T, R]`, float32 (`out` when given). Rows whose slot is -1 are unspecified.
    """
    check_shrink_args(x, lora_a, meta, out)
    T, H_in = x.shape
    R = lora_a.shape[1]
    v = out if out is not None else torch.empty(T, R, dtype=torch.float32, device=x.device)  # [T, R]
    if meta.no_lora:
        return v
    D = meta.active_slots.shape[0]
    cfg = config or shrink_config(meta.max_seg_len, D, H_in, R, x.device)
    if cfg.split_k > 1:
        v.zero_()
    grid = (
        triton.cdiv(meta.max_seg_len, cfg.block_m) * triton.cdiv(R, cfg.block_n),
        cfg.split_k,
        D,
    )
    _lora_shrink_kernel[grid](
        x, lora_a, v,
        meta.sorted_token_ids, meta.active_slots, meta.seg_starts,
        H_in, R,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), v.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        UPCAST=_upcast_dot(x), DOT_PRECISION=_dot_precision(x),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return v


# --------------------------------------------------------------------------------------------
# expand: y[t, :] += scale[slot[t]] * v[t, :] @ lora_b[slot[t]]
# --------------------------------------------------------------------------------------------


@triton.jit
def _lora_expand_kernel(
    # Pointers
    y_ptr,  # [T, N], modified in place
    v_ptr,  # [T, R] float32
    b_ptr,  # [S, R, N]
    scale_ptr,  # [S] float32
    dora_ptr,  # [S, N] float32 DoRA row scale (read only when HAS_DORA)
    sorted_token_ids_ptr,  # [N] int32
    active_slots_ptr,  # [D] int32
    seg_starts_ptr,  # [D + 1] int32
    # Sizes
    N,  # H_out
    R,  # rank (slot width)
    # Strides (innermost strides are 1)
    stride_yt,
    stride_vt,
    stride_bs,
    stride_br,
    stride_ds,
    # Meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # tile of the rank dimension
    HAS_DORA: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_mn = tl.program_id(0)
    pid_d = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid_mn // num_n
    pid_n = pid_mn % num_n

    slot, rows, row_mask, live = segment_tile(
        sorted_token_ids_ptr, active_slots_ptr, seg_starts_ptr, pid_m, pid_d, BLOCK_M
    )
    if not live:  # slot -1 or a tile past the end of a short segment: y untouched
        return

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    v_rows = v_ptr + rows[:, None] * stride_vt  # [BLOCK_M, 1]
    b_cols = b_ptr + slot * stride_bs + offs_n[None, :]  # [1, BLOCK_N], contiguous along N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < R
        v = tl.load(v_rows + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_cols + offs_k[:, None] * stride_br, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        # v is fp32; 16-bit weights take v in their dtype (tensor cores), as the twin does.
        acc += tl.dot(v.to(b.dtype), b, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]

    # Epilogue: scale, add to the base output in fp32 (DoRA: times the per-output-row scale),
    # round once to y's dtype.
    acc *= tl.load(scale_ptr + slot)
    y_tile = y_ptr + rows[:, None] * stride_yt + offs_n[None, :]
    y_mask = row_mask[:, None] & n_mask[None, :]
    y = tl.load(y_tile, mask=y_mask, other=0.0)
    out = y.to(tl.float32) + acc
    if HAS_DORA:
        out *= tl.load(dora_ptr + slot * stride_ds + offs_n, mask=n_mask, other=1.0)[None, :]
    tl.store(y_tile, out.to(y.dtype), mask=y_mask)


def lora_expand_triton(
    y: torch.Tensor,  # [T, H_out], modified in place
    v: torch.Tensor,  # [T, R] float32
    lora_b: torch.Tensor,  # [S, R, H_out]
    scale: torch.Tensor,  # [S] float32
    meta: LoRABatchMeta,
    *,
    config: LaunchConfig | None = None,
) -> None:
    """Triton `lora_expand`; see lorad.kernels.lora_expand for the contract.

    Semantics:
      for t in range(T):
          s = meta.token_slots[t]
          if s != -1:
              u = v[t, :] if y.dtype == float32 else float32(y.dtype(v[t, :]))  # 16-bit: v rounded
              y[t, :] = y.dtype(float32(y[t, :]) + scale[s] * (u @ float32(lora_b[s])))  # fp32 acc.
      # rows whose slot is -1 are never read or written; an all -1 batch launches nothing

    Args:
      y: Shape `[T, H_out]`. Will be changed in place. v: Shape `[T, R]` float32.
      lora_b: Shape `[S, R, H_out]`, y's dtype. scale: Shape `[S]` float32.
      meta: from build_lora_meta, its tensors on y's device.
      config: tile sizes (tests force small tiles); default from kernel_utils.expand_config.
    """
    check_expand_args(y, v, lora_b, scale, meta)
    if meta.no_lora:
        return
    _launch_expand(y, v, lora_b, scale, None, meta, config)


def lora_expand_dora_triton(
    y: torch.Tensor,  # [T, H_out], modified in place
    v: torch.Tensor,  # [T, R] float32
    lora_b: torch.Tensor,  # [S, R, H_out]
    scale: torch.Tensor,  # [S] float32
    dora_scale: torch.Tensor,  # [S, H_out] float32
    meta: LoRABatchMeta,
    *,
    config: LaunchConfig | None = None,
) -> None:
    """Triton `lora_expand_dora`; see lorad.kernels.lora_expand_dora for the contract.

    Semantics:
      for t in range(T):
          s = meta.token_slots[t]
          if s != -1:
              u = v[t, :] if y.dtype == float32 else float32(y.dtype(v[t, :]))  # 16-bit: v rounded
              y[t, :] = y.dtype(dora_scale[s, :] * (float32(y[t, :]) + scale[s] * (u @ float32(lora_b[s]))))
    """
    check_expand_args(y, v, lora_b, scale, meta)
    check_dora_scale(dora_scale, lora_b)
    if meta.no_lora:
        return
    _launch_expand(y, v, lora_b, scale, dora_scale, meta, config)


def _launch_expand(y, v, lora_b, scale, dora_scale, meta, config) -> None:
    H_out = y.shape[1]
    R = lora_b.shape[1]
    D = meta.active_slots.shape[0]
    cfg = config or expand_config(meta.max_seg_len, H_out, R, y.device)
    grid = (triton.cdiv(meta.max_seg_len, cfg.block_m) * triton.cdiv(H_out, cfg.block_n), D)
    has_dora = dora_scale is not None
    _lora_expand_kernel[grid](
        y, v, lora_b, scale, dora_scale if has_dora else scale,
        meta.sorted_token_ids, meta.active_slots, meta.seg_starts,
        H_out, R,
        y.stride(0), v.stride(0), lora_b.stride(0), lora_b.stride(1),
        dora_scale.stride(0) if has_dora else 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, HAS_DORA=has_dora,
        UPCAST=_upcast_dot(y), DOT_PRECISION=_dot_precision(y),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
