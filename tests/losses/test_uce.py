"""UCE's closed form (losses.uce, arXiv 2308.14761 Eq. 7) on small random matrices: it is the minimiser of the stated
objective (zero gradient, lower than perturbations), it equals the paper's formula written with an explicit inverse,
preserved embeddings orthogonal to the erased ones keep their outputs exactly, and with a small lamb the erased
embeddings give their guides' outputs."""
from __future__ import annotations

import pytest
import torch

from losses.uce import uce_objective, uce_weight


def problem(seed: int = 0, out: int = 5, dim: int = 8, n_e: int = 2, n_p: int = 3):
    g = torch.Generator().manual_seed(seed)
    w_old = torch.randn(out, dim, generator=g, dtype=torch.float64)
    erase, guide, preserve = (torch.randn(n, dim, generator=g, dtype=torch.float64) for n in (n_e, n_e, n_p))
    return w_old, erase, guide, preserve


@pytest.mark.parametrize("scales", [(1.0, 1.0, 0.5), (2.0, 0.3, 0.1), (1.0, 0.0, 1.0)])
def test_the_closed_form_minimises_the_objective(scales):
    w_old, erase, guide, preserve = problem()
    w = uce_weight(w_old, erase, guide, preserve, *scales).requires_grad_(True)
    value = uce_objective(w, w_old, erase, guide, preserve, *scales)
    (grad,) = torch.autograd.grad(value, w)
    assert grad.abs().max() < 1e-10
    with torch.no_grad():
        for seed in range(3):
            nudge = 1e-3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            assert uce_objective(w + nudge, w_old, erase, guide, preserve, *scales) > value


def test_the_closed_form_is_the_papers_formula_with_an_explicit_inverse():
    w_old, erase, guide, preserve = problem(1)
    lamb, es, ps = 0.5, 1.0, 1.0
    mat1 = lamb * w_old.clone()
    mat2 = lamb * torch.eye(w_old.shape[1], dtype=torch.float64)
    for c, g in zip(erase, guide):  # sums of outer products, one concept at a time, as Eq. 7 is written
        v_star = w_old @ g
        mat1 += es * torch.outer(v_star, c)
        mat2 += es * torch.outer(c, c)
    for c in preserve:
        mat1 += ps * torch.outer(w_old @ c, c)
        mat2 += ps * torch.outer(c, c)
    torch.testing.assert_close(uce_weight(w_old, erase, guide, preserve, es, ps, lamb), mat1 @ torch.inverse(mat2),
                               rtol=0, atol=1e-10)


def test_preserved_outputs_are_unchanged_and_erased_ones_become_the_guides():
    w_old, erase, guide, preserve = problem(2, dim=12)
    basis, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    erase, preserve = erase @ basis[:, :4] @ basis[:, :4].T, preserve @ basis[:, 4:] @ basis[:, 4:].T  # orthogonal spans
    w = uce_weight(w_old, erase, guide, preserve, lamb=1e-8)
    torch.testing.assert_close(preserve @ w.T, preserve @ w_old.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(erase @ w.T, guide @ w_old.T, rtol=0, atol=1e-5)
    assert (w - w_old).abs().max() > 0.1
    loose = uce_weight(w_old, erase, guide, preserve, lamb=0.5)  # lamb pulls toward the original: partial erasure
    torch.testing.assert_close(preserve @ loose.T, preserve @ w_old.T, rtol=0, atol=1e-10)
    assert (erase @ loose.T - guide @ w_old.T).abs().max() > 1e-3


def test_bad_shapes_and_a_zero_lamb_are_refused():
    w_old, erase, guide, preserve = problem()
    with pytest.raises(ValueError, match="must both be"):
        uce_weight(w_old, erase, guide[:1], preserve)
    with pytest.raises(ValueError, match="lamb must be > 0"):
        uce_weight(w_old, erase, guide, preserve, lamb=0.0)
    assert uce_weight(w_old.float(), erase.float(), guide.float(), None).dtype == torch.float32
