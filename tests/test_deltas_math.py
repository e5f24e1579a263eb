"""Delta math against direct implementations written here: the SVD factoring and the TIES / DARE /
magnitude-prune operators of lorad.deltas, on small dense matrices (no model, milliseconds)."""

from __future__ import annotations

import pytest
import torch

from lorad.deltas.factor import factor_dense, factor_sum
from lorad.deltas.methods import combine_dense, dare_generator, trim


def _terms(seed: int, out: int = 48, inp: int = 40, ranks=(4, 6, 3)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g)) for r in ranks]


def _dense(terms):
    return sum(b.double() @ a.double() for b, a in terms)


def _rel(x, y) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


def test_factor_sum_is_exact_at_the_sum_of_ranks():
    terms = _terms(0)
    m = _dense(terms)
    f = factor_sum(terms)  # rank None: every direction
    assert f.rank == 13
    assert _rel(f.b @ f.a, m) < 1e-6  # float32 storage of exact float64 factors
    assert f.error < 1e-12


def test_factor_sum_truncation_is_the_best_rank_k_and_reports_its_residual():
    terms = _terms(1)
    m = _dense(terms)
    f = factor_sum(terms, 5)
    u, s, vh = torch.linalg.svd(m)
    best = (u[:, :5] * s[:5]) @ vh[:5]
    assert f.rank == 5
    assert _rel(f.b @ f.a, best) < 1e-6  # Eckart-Young: the same matrix as dense SVD truncation
    residual = float((m - (f.b.double() @ f.a.double())).norm() / m.norm())
    assert f.error == pytest.approx(residual, rel=1e-5)
    assert f.error > 0.05  # a real truncation, not a vacuous one


def test_factor_dense_reports_its_residual():
    g = torch.Generator().manual_seed(2)
    m = torch.randn(30, 20, generator=g)
    for k in (1, 7, 20):
        f = factor_dense(m, k)
        residual = float((m.double() - f.b.double() @ f.a.double()).norm() / m.double().norm())
        assert f.error == pytest.approx(residual, rel=1e-4, abs=1e-7)
    assert factor_dense(m, 20).error < 1e-12


def test_trim_keeps_exactly_the_largest_magnitudes():
    t = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.0]])
    kept = trim(t, 0.5)  # round(0.5 * 6) = 3 entries
    assert torch.equal(kept, torch.tensor([[0.0, -5.0, 0.3], [2.0, 0.0, 0.0]]))


# ---- the papers' formulas, written directly ----------------------------------------------------


def _topk_by_sort(t: torch.Tensor, density: float) -> torch.Tensor:
    """TIES 'trim': keep the k = round(d * n) largest |t|, by sorting (not topk)."""
    k = max(1, round(density * t.numel()))
    threshold = t.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(t.abs() >= threshold, t, torch.zeros_like(t))


def _ties_reference(taus, density, sign_method):
    """TIES-Merging (arXiv 2306.01708) eq. 1-3, entry by entry."""
    trimmed = [_topk_by_sort(t, density) for t in taus]
    out = torch.zeros_like(taus[0])
    for idx in range(out.numel()):
        values = [float(t.flatten()[idx]) for t in trimmed]
        if sign_method == "total":
            votes = sum(values)
        else:
            votes = sum((v > 0) - (v < 0) for v in values)
        gamma = 1.0 if votes >= 0 else -1.0
        agree = [v for v in values if v != 0 and (v > 0) == (gamma > 0)]
        out.view(-1)[idx] = sum(agree) / len(agree) if agree else 0.0
    return out


def _dare_reference(taus, density, seed, module):
    """DARE (arXiv 2311.03099): m ~ Bernoulli(d) from the documented per-input generator, t * m / d."""
    out = []
    for i, t in enumerate(taus):
        u = torch.rand(t.shape, generator=dare_generator(seed, module, i))
        out.append(torch.where(u < density, t / density, torch.zeros_like(t)))
    return out


@pytest.fixture
def taus():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(12, 10, generator=g) * s for s in (1.0, 0.5, -2.0)]


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_ties_matches_the_paper(taus, sign_method):
    got = combine_dense("ties", taus, density=0.3, sign_method=sign_method)
    assert torch.allclose(got, _ties_reference(taus, 0.3, sign_method), atol=1e-6)


def test_magnitude_prune_matches_the_formula(taus):
    got = combine_dense("magnitude_prune", taus, density=0.25)
    assert torch.allclose(got, sum(_topk_by_sort(t, 0.25) for t in taus), atol=1e-6)


def test_dare_linear_and_dare_ties_match_the_formulas(taus):
    dropped = _dare_reference(taus, 0.4, seed=5, module="m")
    got = combine_dense("dare_linear", taus, density=0.4, seed=5, module="m")
    assert torch.allclose(got, sum(dropped), atol=1e-6)
    got = combine_dense("dare_ties", taus, density=0.4, seed=5, module="m")
    assert torch.allclose(got, _ties_reference(dropped, 1.0, "total"), atol=1e-6)


def test_dare_is_unbiased_and_keeps_the_density():
    t = torch.ones(200, 200)
    kept = [combine_dense("dare_linear", [t], density=0.3, seed=s, module="x") for s in range(20)]
    fraction = sum(float((k != 0).float().mean()) for k in kept) / len(kept)
    assert abs(fraction - 0.3) < 0.01  # 800k Bernoulli(0.3) draws: sigma ~ 5e-4
    assert abs(float(torch.stack(kept).mean()) - 1.0) < 0.01  # E[dare(t)] = t


def test_majority_sign_methods_differ_where_mass_and_votes_disagree():
    # hand-placed values at one entry: votes say +, mass says -
    taus = [torch.tensor([[1.0]]), torch.tensor([[1.0]]), torch.tensor([[-5.0]])]
    assert float(combine_dense("ties", taus, density=1.0, sign_method="total")) == -5.0
    assert float(combine_dense("ties", taus, density=1.0, sign_method="frequency")) == 1.0


def test_dare_masks_depend_on_seed_module_and_input_only():
    a = dare_generator(1, "model.layers.0.self_attn.q_proj", 0)
    b = dare_generator(1, "model.layers.0.self_attn.q_proj", 0)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    for other in (dare_generator(2, "model.layers.0.self_attn.q_proj", 0),
                  dare_generator(1, "model.layers.1.self_attn.q_proj", 0),
                  dare_generator(1, "model.layers.0.self_attn.q_proj", 1)):
        assert not torch.equal(torch.rand(5, generator=dare_generator(1, "model.layers.0.self_attn.q_proj", 0)),
                               torch.rand(5, generator=other))
