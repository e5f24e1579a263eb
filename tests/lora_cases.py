"""Shared cases for the LoRA op tests: problem builder, popularity distributions, fp64 reference.

Imported by test_lora_ops.py (the PyTorch twin, in-process) and test_lora_triton.py (the Triton
kernels, in a TRITON_INTERPRET=1 subprocess on CPU). Nothing here imports triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# How many tokens each adapter gets (Punica's "popularity" axis).
#   distinct    token t -> slot t % S, shuffled: every token its own adapter while T <= S
#   uniform     every token an independent uniform slot, tokens not grouped
#   skewed      segments of [1, T-1] tokens (the distribution behind Punica's SGMV deadlock fix)
#   identical   every token the same slot
#   mixed_base  uniform, with every third token -1 (base only)
#   all_base    every token -1
POPULARITIES = ("distinct", "uniform", "skewed", "identical", "mixed_base", "all_base")

# Absolute slack on top of twice the twin's error, per dtype, in units of max(1, max|ref|).
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_slots(popularity: str, num_tokens: int, num_slots: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    T, S = num_tokens, num_slots
    if popularity == "distinct":
        slots = [t % S for t in range(T)]
        return [slots[i] for i in torch.randperm(T, generator=g).tolist()]
    if popularity == "uniform":
        return torch.randint(0, S, (T,), generator=g).tolist()
    if popularity == "skewed":
        return [0] + [S - 1] * (T - 1)  # grouped in token order: segments [1, T-1]
    if popularity == "identical":
        return [S // 2] * T
    if popularity == "mixed_base":
        slots = torch.randint(0, S, (T,), generator=g).tolist()
        return [-1 if t % 3 == 1 else s for t, s in enumerate(slots)]
    if popularity == "all_base":
        return [-1] * T
    raise ValueError(f"unknown popularity {popularity!r}")


@dataclass
class Problem:
    x: torch.Tensor  # [T, H_in]
    lora_a: torch.Tensor  # [S, R, H_in]
    lora_b: torch.Tensor  # [S, R, H_out]
    scale: torch.Tensor  # [S] float32
    y0: torch.Tensor  # [T, H_out], the base output before expand
    slots: list[int]
    ranks: list[int]  # true rank per slot (<= R, the rest of the slot is zero)


def make_problem(
    slots: list[int],
    num_slots: int,
    h_in: int,
    h_out: int,
    ranks: int | list[int],
    dtype: torch.dtype,
    seed: int = 0,
) -> Problem:
    """Random weights scaled so that v and the delta are O(1); ranks zero-padded to max."""
    g = torch.Generator().manual_seed(seed)
    S, T = num_slots, len(slots)
    ranks = [ranks] * S if isinstance(ranks, int) else [ranks[s % len(ranks)] for s in range(S)]
    R = max(ranks)
    a = torch.randn(S, R, h_in, generator=g) / h_in**0.5
    b = torch.randn(S, R, h_out, generator=g)
    for s, r in enumerate(ranks):
        a[s, r:] = 0.0
        b[s, r:] = 0.0
        b[s] /= r**0.5
    return Problem(
        x=torch.randn(T, h_in, generator=g).to(dtype),
        lora_a=a.to(dtype),
        lora_b=b.to(dtype),
        scale=torch.rand(S, generator=g) + 0.5,
        y0=torch.randn(T, h_out, generator=g).to(dtype),
        slots=list(slots),
        ranks=ranks,
    )


def reference(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 token-by-token loop: (v_ref [T, R], y_ref [T, H_out]); v_ref rows of -1 are 0."""
    x, a, b = p.x.double(), p.lora_a.double(), p.lora_b.double()
    v = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float64)
    y = p.y0.double().clone()
    for t, s in enumerate(p.slots):
        if s != -1:
            v[t] = a[s] @ x[t]
            y[t] += float(p.scale[s]) * (v[t] @ b[s])
    return v, y


def max_err(out: torch.Tensor, ref: torch.Tensor, rows: list[int]) -> float:
    if not rows:
        return 0.0
    return (out[rows].double() - ref[rows]).abs().max().item()


def assert_matches_reference(name: str, out: torch.Tensor, twin: torch.Tensor, ref: torch.Tensor,
                             rows: list[int], dtype: torch.dtype) -> None:
    """err(out) <= 2 * err(twin) + atol on `rows`, both measured against the fp64 reference."""
    err, err_twin = max_err(out, ref, rows), max_err(twin, ref, rows)
    scale = max(1.0, ref[rows].abs().max().item()) if rows else 1.0
    atol = ATOL[dtype] * scale
    assert err <= 2 * err_twin + atol, (
        f"{name}: max error {err:.3e} vs fp64 reference exceeds 2 * twin error {err_twin:.3e} + atol {atol:.1e}"
    )


def contract_shrink(p: Problem) -> torch.Tensor:
    """lora_shrink's `Semantics:` run literally, token by token: v [T, R] float32 (rows of -1 zero).

    fp32 accumulation; for fp16 / bf16 inputs each row is rounded to the input dtype, as the
    contract allows (the twin's 16-bit matmul does it; the Triton kernel is closer). An
    implementation independent of both, the baseline of their tolerance.
    """
    v = torch.zeros(p.x.shape[0], p.lora_a.shape[1], dtype=torch.float32)
    for t, s in enumerate(p.slots):
        if s != -1:
            row = p.x[t].float() @ p.lora_a[s].float().T  # [R]
            v[t] = row.to(p.x.dtype).float()
    return v


def contract_loop(p: Problem) -> torch.Tensor:
    """The ops' `Semantics:` pseudo-code run literally, token by token, in fp32: y [T, H_out].

    Its error against `reference` is the rounding the contract itself implies (inputs and output
    in the given dtype, 16-bit weights multiplying a v rounded to their dtype), the baseline for
    the twin's tolerance.
    """
    y = p.y0.clone()
    for t, s in enumerate(p.slots):
        if s != -1:
            v = p.x[t].float() @ p.lora_a[s].float().T  # [R]
            delta = float(p.scale[s]) * (v.to(p.lora_b.dtype).float() @ p.lora_b[s].float())
            y[t] = (p.y0[t].float() + delta).to(y.dtype)
    return y


def widen(p: Problem, wide_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The problem's pools inside wider zero-padded ones: (a [S, wide, H_in], b [S, wide, H_out]).

    p.lora_a == a[:, :R] and p.lora_b == b[:, :R]: the rank slice a caller passes to skip the
    zero rows when every adapter in its batch has rank <= R.
    """
    S, R, h_in = p.lora_a.shape
    a = torch.zeros(S, wide_rank, h_in, dtype=p.lora_a.dtype)
    b = torch.zeros(S, wide_rank, p.lora_b.shape[2], dtype=p.lora_b.dtype)
    a[:, :R], b[:, :R] = p.lora_a, p.lora_b
    return a, b
