"""The sparsifying combination operators, on dense task vectors (one module's deltas).

Every operator takes tau_i = w_i * dW_i (the user's weight applied to adapter i's true delta,
[out, in] float32; a negative weight negates the task vector before anything else) and returns
the combined delta of that module. Semantics (d = density, per module and per adapter):

    trim(t, d)          keep the k = round(d * numel) entries of largest |t| (at least 1), zero the rest
                        (TIES' "trim" step; PEFT's and mergekit's magnitude pruning)
    dare(t, d, g)       t * m / d with m ~ Bernoulli(d) drawn from generator g: drop and rescale,
                        E[dare(t)] = t (DARE, arXiv 2311.03099)
    elect_sign(ts)      gamma = sgn(sum_i t_i)        "total": the sign of the summed mass (TIES paper)
                        gamma = sgn(sum_i sgn(t_i))   "frequency": the sign most adapters vote for
                        a zero sum elects +1
    disjoint_mean(ts,g) sum_i t_i * [sgn(t_i) == gamma] / max(1, #{i : sgn(t_i) == gamma})
                        (entries trimmed to 0 have sign 0 and never count)

    magnitude_prune  = sum_i trim(tau_i, d)
    ties             = disjoint_mean(trim(tau_i, d), elect_sign(trim(tau_i, d)))   (arXiv 2306.01708)
    dare_linear      = sum_i dare(tau_i, d)
    dare_ties        = disjoint_mean over dare(tau_i, d) with its elected sign

Trimming is per module (PEFT and mergekit do the same; the TIES paper trims the whole model's
vector at once, which would need every module in memory).
"""

from __future__ import annotations

import hashlib

import torch

SIGN_METHODS = ("total", "frequency")


def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    k = max(1, round(density * t.numel()))
    if k >= t.numel():
        return t.clone()
    flat = t.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k, sorted=False).indices] = True
    return (flat * keep).view_as(t)


def dare(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1.0:
        return t.clone()
    mask = torch.rand(t.shape, generator=generator, dtype=torch.float32) < density
    return t * mask / density


def elect_sign(ts: list[torch.Tensor], method: str) -> torch.Tensor:
    stack = torch.stack(ts)  # [n, out, in]
    votes = stack.sum(0) if method == "total" else stack.sign().sum(0)
    return torch.where(votes >= 0, 1.0, -1.0).to(stack.dtype)


def disjoint_mean(ts: list[torch.Tensor], sign: torch.Tensor) -> torch.Tensor:
    total = torch.zeros_like(ts[0])
    count = torch.zeros_like(ts[0])
    for t in ts:
        agree = (t.sign() == sign).to(t.dtype)
        total += t * agree
        count += agree
    return total / count.clamp(min=1)


def dare_generator(seed: int, module: str, index: int) -> torch.Generator:
    """The DARE mask generator of input `index` at `module`: depends on nothing but these three, so
    a combination is reproducible whatever the module order or the set of other modules."""
    digest = hashlib.sha256(f"{seed}:{module}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def combine_dense(method: str, taus: list[torch.Tensor], *, density: float, sign_method: str = "total",
                  seed: int = 0, module: str = "") -> torch.Tensor:
    """One module's combined delta [out, in] for a sparsifying method (see the module docstring)."""
    if method == "magnitude_prune":
        return torch.stack([trim(t, density) for t in taus]).sum(0)
    if method in ("dare_linear", "dare_ties"):
        dropped = [dare(t, density, dare_generator(seed, module, i)) for i, t in enumerate(taus)]
        if method == "dare_linear":
            return torch.stack(dropped).sum(0)
        return disjoint_mean(dropped, elect_sign(dropped, sign_method))
    if method == "ties":
        trimmed = [trim(t, density) for t in taus]
        return disjoint_mean(trimmed, elect_sign(trimmed, sign_method))
    raise ValueError(f"not a dense combination method: {method!r}")
