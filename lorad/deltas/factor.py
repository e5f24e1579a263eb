"""Factor a module's delta back into LoRA factors by truncated SVD, and say what was lost.

Contract (both entry points): given a delta M [out, in] and a target rank R, return
    B [out, k], A [k, in],  k = min(R, rank bound of M)
with B @ A the best rank-k approximation of M in the Frobenius norm (Eckart-Young), and
    error = ||M - B @ A||_F / ||M||_F   (0 when M is 0)
computed from the singular values: error^2 = sum_{j >= k} s_j^2 / sum_j s_j^2, an identity of the
SVD (tests/test_deltas_math.py checks it against the residual). The singular values are split
evenly, B = U sqrt(S), A = sqrt(S) V^T, so neither factor carries the whole magnitude.

  * factor_sum(terms, R): M = sum_i B_i @ A_i (linear, svd, the merge reference) without ever
    forming M: QR of the stacked factors, SVD of the small K x K core (K = sum of the ranks), in
    float64. Exact (to float64 rounding) when R >= K: no information is dropped.
  * factor_dense(M, R): M given as a dense matrix (ties, dare_*, magnitude_prune, whose
    sparsified deltas have full rank), SVD in float64.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with n intra-op threads (None: leave them). The per-module problems here are
    small (a QR of [out, K] with K ~ 10-100): a parallel region costs more than it saves, and on a
    busy 2-core machine far more (measured: QR of a [1536, 24] float64 matrix 1-2 ms on one thread,
    30-110 ms on two at load average 10). torch.set_num_threads is process-wide for MKL, so a
    server calling this from a side thread should pass None."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Factored:
    a: torch.Tensor  # [k, in] float32
    b: torch.Tensor  # [out, k] float32
    error: float  # relative Frobenius error of b @ a against M
    norm: float  # ||M||_F
    residual: float  # ||M - b @ a||_F

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def _truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> Factored:
    # u: [out, n], s: [n] (descending), vh: [n, in], float64
    k = max(1, min(rank, s.shape[0]))
    energy = s.square()
    total = float(energy.sum())
    residual = float(energy[k:].sum()) ** 0.5
    root = s[:k].sqrt()
    b = (u[:, :k] * root).float()  # [out, k]
    a = (root[:, None] * vh[:k]).float()  # [k, in]
    norm = total**0.5
    return Factored(a=a, b=b, error=residual / norm if norm > 0 else 0.0, norm=norm, residual=residual)


def factor_sum(terms: list[tuple[torch.Tensor, torch.Tensor]], rank: int | None = None) -> Factored:
    """Best rank-`rank` factors of M = sum_i b_i @ a_i (b_i [out, r_i], a_i [r_i, in]).

    rank None keeps every direction (K = sum of r_i, capped at min(out, in)): exact.
    """
    b = torch.cat([bi.double() for bi, _ in terms], dim=1)  # [out, K]
    a = torch.cat([ai.double() for _, ai in terms], dim=0)  # [K, in]
    qb, rb = torch.linalg.qr(b)  # [out, p], [p, K]
    qa, ra = torch.linalg.qr(a.T)  # [in, q], [q, K]
    core = rb @ ra.T  # [p, q]: M = qb @ core @ qa.T
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    full = _truncate(qb @ u, s, vh @ qa.T, rank if rank is not None else s.shape[0])
    return full


def factor_dense(m: torch.Tensor, rank: int) -> Factored:
    """Best rank-`rank` factors of a dense M [out, in]."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return _truncate(u, s, vh, rank)
