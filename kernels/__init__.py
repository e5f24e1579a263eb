"""Multi-adapter LoRA ops (Punica-style shrink / expand) and their dispatcher.

Every adapted projection of the engine computes, for all tokens of a mixed batch at once,

    y = base(x);  v = lora_shrink(x, lora_a, meta);  lora_expand(y, v, lora_b, scale, meta)

where each token carries the device slot of its adapter (-1 = base only). Two implementations
share these signatures: Triton kernels (CUDA, or CPU through TRITON_INTERPRET=1 for tests) and
a PyTorch twin (the CPU path and the tests' oracle). `backend` picks one:

    "auto"   Triton for CUDA tensors when triton imports, else the twin (default)
    "torch"  the twin
    "triton" the Triton kernels (CPU tensors need TRITON_INTERPRET=1 set before triton loads)
    "cpu"    add_lora's fp32 decode layout in C (lorad.kernels.lora_cpu, built on first use),
             the twin for everything else; "auto" picks it for CPU tensors where it builds

The environment variable LORAD_LORA_BACKEND sets the default for calls that pass none.

Under torch.compile the ops are traced as the custom ops lorad::add_lora, lorad::lora_shrink
and lorad::lora_expand (kernels/custom_ops.py, with fake implementations); eager calls run the
implementation directly.
"""

from __future__ import annotations

import os

import torch

from lorad.kernels import custom_ops, lora_cpu
from lorad.kernels.lora_ops_torch import add_lora_torch, lora_expand_dora_torch, lora_expand_torch, lora_shrink_torch
from lorad.kernels.metadata import NO_LORA, LoRABatchMeta, build_lora_meta

BACKENDS = ("auto", "torch", "triton", "cpu")

__all__ = [
    "BACKENDS",
    "add_lora",
    "NO_LORA",
    "LoRABatchMeta",
    "build_lora_meta",
    "lora_expand",
    "lora_expand_dora",
    "lora_shrink",
    "resolve_backend",
]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The implementation ("torch", "triton" or "cpu") that runs for tensors on `device`."""
    choice = backend or os.environ.get("LORAD_LORA_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"LoRA backend {choice!r} is not one of {', '.join(BACKENDS)}")
    if choice == "auto":
        if device.type == "cuda":
            return "triton" if triton_available() else "torch"
        return "cpu" if device.type == "cpu" and lora_cpu.available() else "torch"
    if choice == "cpu" and not lora_cpu.available():
        raise RuntimeError(f"LoRA backend 'cpu' was asked for but its kernel is unavailable: "
                           f"{lora_cpu.unavailable_reason()}")
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("LoRA backend 'triton' was asked for but triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "LoRA backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
            )
    return choice


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    meta: LoRABatchMeta,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Project every token onto the low-rank space of its own adapter.

    Semantics:
      for t in range(T):
          s = meta.token_slots[t]
          if s != -1:
              v[t, :] = float32(x[t, :]) @ float32(lora_a[s, :, :]).T   # accumulated in fp32
              if x.dtype != float32:                # fp16 / bf16: v[t, :] MAY be rounded to
                  v[t, :] = float32(x.dtype(v[t, :]))   # x.dtype (the twin's 16-bit matmul
                                                    # does; the Triton kernel keeps fp32)
      # rows of v whose slot is -1 are left unspecified; lora_expand ignores them
      # v is float32 in every case; lora_expand rounds it to y's dtype anyway

    Args:
      x: Shape `[T, H_in]`, float32 / float16 / bfloat16, contiguous. Token activations.
      lora_a: Shape `[S, R, H_in]`, same dtype as x. Slot pool of A matrices; an adapter of
        rank r < R occupies rows [0, r) of its slot and the rest is zero. Each slot must be a
        row-major matrix; a rank slice `pool[:, :r]` of a wider pool qualifies, which lets a
        caller skip the zero rows when every adapter in the batch has rank <= r.
      meta: LoRABatchMeta from build_lora_meta(token_slots, S).
      out: Optional shape `[T, R]` float32 buffer. Overwritten (not accumulated).
      backend: "auto" | "torch" | "triton" | "cpu"; see the module docstring.

    Returns:
      v: Shape `[T, R]`, float32 (`out` when given).
    """
    backend = resolve_backend(x.device, backend)
    if out is None and torch.compiler.is_compiling():
        return custom_ops.lora_shrink_op(x, lora_a, meta, backend)
    return _lora_shrink_impl(x, lora_a, meta, out, backend)


def _lora_shrink_impl(x, lora_a, meta, out, backend: str) -> torch.Tensor:
    if backend == "triton":
        from lorad.kernels.lora_ops_triton import lora_shrink_triton

        return lora_shrink_triton(x, lora_a, meta, out)
    return lora_shrink_torch(x, lora_a, meta, out)


def lora_expand(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor,
    meta: LoRABatchMeta,
    backend: str | None = None,
) -> None:
    """Add every token's adapter delta to the base output, in place.

    Semantics:
      for t in range(T):
          s = meta.token_slots[t]
          if s != -1:
              if y.dtype == float32:
                  y[t, :] += scale[s] * (v[t, :] @ lora_b[s, :, :])          # fp32 throughout
              else:  # fp16 / bf16: 16-bit operands, fp32 accumulation, y rounded to its dtype
                  u = y.dtype(v[t, :])              # v is rounded to y's dtype first (the twin
                                                    # may fold scale[s] in before rounding)
                  y[t, :] = y.dtype(float32(y[t, :]) + scale[s] * (float32(u) @ float32(lora_b[s])))
                  # the twin may round the delta to y.dtype before adding: one more rounding
      # rows whose slot is -1 are not touched; an all -1 batch leaves y bit-identical

    Args:
      y: Shape `[T, H_out]`, float32 / float16 / bfloat16, each row contiguous (stride(1) == 1;
        a column slice of a wider output, such as q's columns of a fused q/k/v output,
        qualifies). Will be changed in place.
      v: Shape `[T, R]`, float32, as returned by lora_shrink.
      lora_b: Shape `[S, R, H_out]`, same dtype as y. Slot pool of B matrices, stored
        transposed with respect to PEFT's [H_out, r] so that each slot is a row-major
        [R, H_out] matrix: the CPU path's bmm reads it without a transpose, and a kernel
        tile of it is contiguous along H_out. A rank slice `pool[:, :r]` qualifies, as for
        lora_shrink (R is then r, for v too).
      scale: Shape `[S]`, float32. Per-slot scaling (lora_alpha / r, or / sqrt(r) for rsLoRA).
      meta: LoRABatchMeta from build_lora_meta(token_slots, S).
      backend: "auto" | "torch" | "triton" | "cpu"; see the module docstring.
    """
    backend = resolve_backend(y.device, backend)
    if torch.compiler.is_compiling():
        custom_ops.lora_expand_op(y, v, lora_b, scale, meta, backend)
        return
    _lora_expand_impl(y, v, lora_b, scale, meta, backend)


def _lora_expand_impl(y, v, lora_b, scale, meta, backend: str) -> None:
    if backend == "triton":
        from lorad.kernels.lora_ops_triton import lora_expand_triton

        lora_expand_triton(y, v, lora_b, scale, meta)
        return
    lora_expand_torch(y, v, lora_b, scale, meta)


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor,
    meta: LoRABatchMeta,
    backend: str | None = None,
) -> None:
    """lora_shrink then lora_expand, in one call: what the engine runs per adapted projection.

    Semantics:
      v = lora_shrink(x, lora_a, meta)            # [T, R] float32
      lora_expand(y, v, lora_b, scale, meta)      # y modified in place

    Same arguments and shapes as the two ops. One call instead of two matters on the CPU,
    where the decode step adds LoRA to 210 projections of tiny matrices and per-call Python
    overhead is a large part of the cost: the twin checks once, keeps v private and, for the
    common decode layout, runs three torch calls in all.
    """
    backend = resolve_backend(y.device, backend)
    if torch.compiler.is_compiling():
        custom_ops.add_lora_op(y, x, lora_a, lora_b, scale, meta, backend)
        return
    _add_lora_impl(y, x, lora_a, lora_b, scale, meta, backend)


def _add_lora_impl(y, x, lora_a, lora_b, scale, meta, backend: str) -> None:
    if backend == "triton":
        from lorad.kernels.lora_ops_triton import lora_expand_triton, lora_shrink_triton

        lora_expand_triton(y, lora_shrink_triton(x, lora_a, meta), lora_b, scale, meta)
        return
    if backend == "cpu":
        lora_cpu.add_lora_cpu(y, x, lora_a, lora_b, scale, meta)
        return
    add_lora_torch(y, x, lora_a, lora_b, scale, meta)


def lora_expand_dora(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor,
    dora_scale: torch.Tensor,
    meta: LoRABatchMeta,
    backend: str | None = None,
) -> None:
    """lora_expand for DoRA adapters: the sum is multiplied by a per-slot, per-output-row scale.

    Semantics:
      for t in range(T):
          s = meta.token_slots[t]
          if s != -1:
              u = v[t, :]     # fp16 / bf16 y: the Triton kernel rounds u to y's dtype first, the twin does not
              y[t, :] = y.dtype(dora_scale[s, :] * (float32(y[t, :]) + scale[s] * (float32(u) @ float32(lora_b[s]))))
              # delta and sum in fp32, rounded once
      # rows whose slot is -1 are not touched; an all -1 batch leaves y bit-identical

    Args:
      y: Shape `[T, H_out]`, the base output *without bias* (DoRA does not scale the bias; the
        Llama projections have none). Will be changed in place.
      v, lora_b, scale, meta, backend: as for lora_expand.
      dora_scale: Shape `[S, H_out]`, float32. magnitude / ||W + scale * B A||_row per slot
        (lorad.kernels.dora.dora_row_scale, computed once at adapter load); a row of ones for
        a slot that holds a plain LoRA adapter.
    """
    if resolve_backend(y.device, backend) == "triton":
        from lorad.kernels.lora_ops_triton import lora_expand_dora_triton

        lora_expand_dora_triton(y, v, lora_b, scale, dora_scale, meta)
        return
    lora_expand_dora_torch(y, v, lora_b, scale, dora_scale, meta)
