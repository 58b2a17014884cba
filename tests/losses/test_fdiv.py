"""Tests of losses/fdiv.py: h(r) = r^2 f''(r) for every divergence, the f-distill gradient against the
analytic gradient of D_f(p_t || q_t) for Gaussians, the density ratio's clamps and the normalisations (the
two-stage scheme of Xu et al.'s code against hand computations)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from losses.dmd import dmd_loss
from losses.fdiv import (DIVERGENCES, check_divergence, density_ratio, f_function, f_weight, fdistill_loss,
                         fdistill_weights, normalize_weights, two_stage_weights, update_ratio_ema)

NAMES = list(DIVERGENCES)


@pytest.mark.parametrize("name", NAMES)
def test_weight_is_r_squared_times_second_derivative_of_f(name):
    r = torch.linspace(0.1, 20.0, 301, dtype=torch.float64, requires_grad=True)
    f = f_function(name)
    (f1,) = torch.autograd.grad(f(r).sum(), r, create_graph=True)
    (f2,) = torch.autograd.grad(f1.sum(), r)
    assert torch.allclose(f_weight(name, r.detach()), r.detach() ** 2 * f2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_every_f_is_convex_and_vanishes_at_one(name):
    # an f-divergence needs f convex with f(1) = 0 (so D_f(p || p) = 0); h > 0 is the convexity
    assert f_function(name)(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(0.0, abs=1e-15)
    assert (f_weight(name, torch.linspace(0.1, 20, 50, dtype=torch.float64)) > 0).all()


def test_table_values_and_documented_constants():
    r = torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64)
    assert torch.equal(f_weight("reverse_kl", r), torch.ones(3, dtype=torch.float64))
    assert torch.equal(f_weight("forward_kl", r), r)
    assert torch.allclose(f_weight("jensen_shannon", r), r / (1 + r))
    assert torch.allclose(f_weight("squared_hellinger", r), r.sqrt() / 2)
    assert torch.allclose(f_weight("jeffreys", r), 1 + r)
    assert torch.allclose(f_weight("pearson", r), 2 * r**2)
    assert torch.allclose(f_weight("neyman", r), 2 / r)
    # our JS f is KL(p||m) + KL(q||m): twice the usual JS
    p, q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64), torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
    m = (p + q) / 2
    js2 = (p * (p / m).log()).sum() + (q * (q / m).log()).sum()
    assert (q * f_function("jensen_shannon")(p / q)).sum().item() == pytest.approx(js2.item(), rel=1e-12)


def test_unknown_divergence_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="jensen_shannon"):
        check_divergence("js")


# ------------------------------------------------------- the f-distill gradient on Gaussians (1-D)

MU_P, S_P = -0.2, 1.0
ALPHA, SIGMA = 0.8, 0.6


def _normal_logpdf(x, m, v):
    return -0.5 * (x - m) ** 2 / v - 0.5 * torch.log(2 * math.pi * v)


def _posterior_mean(x_t, mu, s):
    """E[x0 | x_t] for x0 ~ N(mu, s^2), x_t = ALPHA x0 + SIGMA eps."""
    v = ALPHA**2 * s**2 + SIGMA**2
    return mu + ALPHA * s**2 / v * (x_t - ALPHA * mu)


def _hermite(n):
    """Gauss-Hermite nodes and weights for E over N(0, 1) (probabilists')."""
    u, w = np.polynomial.hermite_e.hermegauss(n)
    return torch.from_numpy(u), torch.from_numpy(w / w.sum())


def analytic_fdiv(name, mu_q, s_q, n=160):
    """D_f(p_t || q_t) = E_{q_t}[f(p_t / q_t)] by Gauss-Hermite quadrature over q_t (differentiable)."""
    u, w = _hermite(n)
    v_q, v_p = ALPHA**2 * s_q**2 + SIGMA**2, ALPHA**2 * S_P**2 + SIGMA**2
    x = ALPHA * mu_q + v_q.sqrt() * u
    log_r = _normal_logpdf(x, ALPHA * MU_P, torch.tensor(v_p, dtype=torch.float64)) - _normal_logpdf(x, ALPHA * mu_q, v_q)
    return (w * f_function(name)(log_r.exp())).sum()


@pytest.mark.parametrize("name", NAMES)
def test_fdistill_gradient_equals_the_analytic_f_divergence_gradient_of_gaussians(name):
    # Xu et al. 2025, Thm 1: grad D_f(p_t||q_t) = E[h(r) (s_q - s_p) . dx_t/dtheta], s_q - s_p =
    # alpha/sigma^2 (D_fake - D_real), dx_t/dtheta = alpha dx/dtheta: the un-normalised DMD gradient with
    # per-sample weight h(r) alpha^2/sigma^2. Expectation over (z, eps) by a 2-D Gauss-Hermite rule.
    mu_q = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    s_q = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    u, w = _hermite(70)
    z, eps = u.repeat_interleave(70), u.repeat(70)
    wq = w.repeat_interleave(70) * w.repeat(70)
    x = (mu_q + s_q * z).reshape(-1, 1, 1, 1)
    x_t = ALPHA * x.detach() + SIGMA * eps.reshape(-1, 1, 1, 1)
    d_real = _posterior_mean(x_t, MU_P, S_P)
    d_fake = _posterior_mean(x_t, mu_q.detach(), s_q.detach())
    v_q, v_p = ALPHA**2 * s_q.detach() ** 2 + SIGMA**2, torch.tensor(ALPHA**2 * S_P**2 + SIGMA**2, dtype=torch.float64)
    r = (_normal_logpdf(x_t, ALPHA * MU_P, v_p) - _normal_logpdf(x_t, ALPHA * mu_q.detach(), v_q)).exp().flatten()
    weight = wq * f_weight(name, r) * ALPHA**2 / SIGMA**2
    g_mu, g_s = torch.autograd.grad(dmd_loss(x, d_real, d_fake, weight=weight, normalize=False).sum(), (mu_q, s_q))
    e_mu, e_s = torch.autograd.grad(analytic_fdiv(name, mu_q, s_q), (mu_q, s_q))
    assert g_mu.item() == pytest.approx(e_mu.item(), rel=1e-9, abs=1e-12)
    assert g_s.item() == pytest.approx(e_s.item(), rel=1e-9, abs=1e-12)


def test_analytic_reference_matches_closed_form_kl():
    mu_q, s_q = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    v_q, v_p = ALPHA**2 * s_q**2 + SIGMA**2, torch.tensor(ALPHA**2 * S_P**2 + SIGMA**2, dtype=torch.float64)
    dm = ALPHA * (mu_q - MU_P)
    kl_qp = 0.5 * (v_q / v_p - 1 - torch.log(v_q / v_p) + dm**2 / v_p)
    kl_pq = 0.5 * (v_p / v_q - 1 - torch.log(v_p / v_q) + dm**2 / v_q)
    assert analytic_fdiv("reverse_kl", mu_q, s_q).item() == pytest.approx(kl_qp.item(), rel=1e-10)
    assert analytic_fdiv("forward_kl", mu_q, s_q).item() == pytest.approx(kl_pq.item(), rel=1e-10)


# ----------------------------------------------------------------------- ratio and normalisation

def test_density_ratio_clamps_logit_then_ratio():
    logits = torch.tensor([-50.0, -10.0, -2.0, 0.0, 1.0, 2.9, 3.5, 50.0])
    r = density_ratio(logits)
    expected = torch.tensor([0.1, 0.1, math.exp(-2), 1.0, math.e, math.exp(2.9), 20.0, 20.0])
    assert torch.allclose(r, expected)
    assert torch.allclose(density_ratio(torch.tensor([-12.0, 12.0]), r_min=0.0, r_max=1e9), torch.tensor([math.exp(-10), math.exp(10)]))
    assert not density_ratio(logits.requires_grad_(True)).requires_grad


def test_weights_have_unit_batch_mean_and_constants_cancel():
    logits = torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=torch.float64)
    wts = fdistill_weights("pearson", logits)
    r = logits.exp()
    assert wts.mean().item() == pytest.approx(1.0)
    assert torch.allclose(wts, r**2 / (r**2).mean())  # the factor 2 in h = 2 r^2 is gone
    assert torch.allclose(fdistill_weights("jensen_shannon", logits), (r / (1 + r)) / (r / (1 + r)).mean())


def test_per_time_bin_normalisation_gives_each_bin_unit_mean():
    h = torch.tensor([1.0, 3.0, 10.0, 2.0, 2.0, 5.0], dtype=torch.float64)
    t = torch.tensor([0.1, 0.2, 0.6, 0.7, 0.95, 1.0], dtype=torch.float64)
    out = normalize_weights(h, t, time_bins=2)
    assert torch.allclose(out, torch.tensor([0.5, 1.5, 10 / 4.75, 2 / 4.75, 2 / 4.75, 5 / 4.75], dtype=torch.float64))
    assert torch.allclose(normalize_weights(h, t, time_bins=0), h / h.mean())


def test_reverse_kl_weighting_reproduces_plain_dmd_exactly():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 4, 4, generator=gen, requires_grad=True)
    d_real, d_fake = torch.randn(6, 1, 4, 4, generator=gen), torch.randn(6, 1, 4, 4, generator=gen)
    logits = 5 * torch.randn(6, generator=gen)
    a = fdistill_loss(x, d_real, d_fake, logits, "reverse_kl", t=torch.rand(6, generator=gen), time_bins=3)
    b = dmd_loss(x, d_real, d_fake)
    assert torch.equal(a, b)
    ga = torch.autograd.grad(a.sum(), x)[0]
    gb = torch.autograd.grad(b.sum(), x)[0]
    assert torch.equal(ga, gb)


def test_forward_kl_upweights_samples_the_teacher_finds_likely():
    x = torch.zeros(2, 1, 2, 2, requires_grad=True)
    d_real, d_fake = torch.zeros(2, 1, 2, 2) - 1, torch.zeros(2, 1, 2, 2)
    logits = torch.tensor([math.log(3.0), 0.0])  # r = 3 and 1 -> weights 1.5 and 0.5
    (g,) = torch.autograd.grad(fdistill_loss(x, d_real, d_fake, logits, "forward_kl").sum(), x)
    (g0,) = torch.autograd.grad(dmd_loss(x, d_real, d_fake).sum(), x)
    assert torch.allclose(g[0], 1.5 * g0[0]) and torch.allclose(g[1], 0.5 * g0[1])


@pytest.mark.parametrize("time_bins", [0, 3])
def test_weights_normalised_over_the_global_batch_match_one_process(time_bins):
    """Split over two processes (samples interleaved as the distributed sampler deals them), the weights
    normalised with the gathered global batch equal those of one process holding the whole batch."""
    torch.manual_seed(0)
    logits, t = torch.randn(12), torch.rand(12)
    whole = fdistill_weights("jensen_shannon", logits, t, time_bins)
    h = f_weight("jensen_shannon", density_ratio(logits))

    def gather(v):  # MethodModule.global_batch on either process: every process's values, global order
        return h if any(torch.equal(v, h[r::2]) for r in range(2)) else t

    for r in range(2):
        got = fdistill_weights("jensen_shannon", logits[r::2], t[r::2], time_bins, gather=gather)
        torch.testing.assert_close(got, whole[r::2])
    local = fdistill_weights("jensen_shannon", logits[0::2], t[0::2], time_bins)
    assert not torch.allclose(local, whole[0::2])  # normalising per process would differ


# ------------------------------------------------- the two-stage normalisation (Xu et al.'s code)

def test_two_stage_updates_each_bins_running_mean_of_r_then_normalises_r_then_h_by_its_batch_mean():
    """By hand, 2 time bins, EMA rate 0.5, running means starting at 1: bin 0 (t < 0.5) holds r = 1, 3 (mean 2),
    bin 1 holds r = 2, 4 (mean 3); the means become 0.5 + 0.5 * 2 = 1.5 and 0.5 + 0.5 * 3 = 2 BEFORE they are used,
    so r / mean = 2/3, 2, 1, 2; JS h = r / (1 + r) = 0.4, 2/3, 0.5, 2/3, divided by their mean 0.5583..."""
    logits = torch.tensor([1.0, 3.0, 2.0, 4.0], dtype=torch.float64).log()
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)
    ema = torch.ones(2, dtype=torch.float64)
    weights, new = two_stage_weights("jensen_shannon", logits, t, ema, rate=0.5)
    assert torch.allclose(new, torch.tensor([1.5, 2.0], dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.equal(ema, torch.ones(2, dtype=torch.float64))  # the state is returned, not changed in place
    e = 1e-6  # the authors' guard in both divisions
    r_n = torch.tensor([1 / (1.5 + e), 3 / (1.5 + e), 2 / (2 + e), 4 / (2 + e)], dtype=torch.float64)
    h = r_n / (1 + r_n)
    torch.testing.assert_close(weights, h / (h.mean() + e), rtol=1e-14, atol=0)
    torch.testing.assert_close(weights, torch.tensor([0.4, 2 / 3, 0.5, 2 / 3], dtype=torch.float64) / (6.7 / 12),
                               rtol=2e-6, atol=0)
    # the one-stage scheme (h of the raw r over its batch mean) differs for the nonlinear JS weight
    assert not torch.allclose(weights, fdistill_weights("jensen_shannon", logits), rtol=1e-3)


def test_the_running_mean_keeps_empty_bins_and_follows_its_rate():
    ema = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    r = torch.tensor([3.0, 1.0, 4.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.2, 1.0], dtype=torch.float64)  # bins 0, 0, 2: bin 1 is empty; t = 1 is in the last bin
    assert torch.allclose(update_ratio_ema(ema, r, t, 0.75), torch.tensor([0.75 + 0.25 * 2, 2.0, 3.75 + 1.0],
                                                                          dtype=torch.float64))
    assert torch.allclose(update_ratio_ema(ema, r, t, 0.0), torch.tensor([2.0, 2.0, 4.0], dtype=torch.float64))
    # two batches in a row: the second normalises with the mean the first left behind
    _, after = two_stage_weights("forward_kl", r.log(), t, ema, 0.5)
    w2, after2 = two_stage_weights("forward_kl", torch.tensor([2.0], dtype=torch.float64).log(),
                                   torch.tensor([0.5], dtype=torch.float64), after, 0.5)
    assert torch.allclose(after2, torch.tensor([after[0], 0.5 * 2.0 + 0.5 * 2.0, after[2]], dtype=torch.float64))
    assert torch.allclose(w2, torch.ones(1, dtype=torch.float64))  # one sample: h / its own mean


def test_the_logit_and_ratio_are_clamped_before_the_per_bin_normalisation():
    """r = exp(clamp(logit, -10, 10)) clamped to [0.1, 20] first; the normalised ratio is not clamped again."""
    logits = torch.tensor([-50.0, 50.0], dtype=torch.float64)  # r = 0.1 and 20, one bin, rate 0: mean 10.05
    t = torch.tensor([0.3, 0.4], dtype=torch.float64)
    weights, new = two_stage_weights("forward_kl", logits, t, torch.ones(1, dtype=torch.float64), 0.0)
    assert new.item() == pytest.approx(10.05, rel=1e-15)
    r_n = torch.tensor([0.1, 20.0], dtype=torch.float64) / (10.05 + 1e-6)  # 0.00995 < 0.1: kept
    torch.testing.assert_close(weights, r_n / (r_n.mean() + 1e-6), rtol=1e-14, atol=0)


def test_two_stage_weights_over_the_global_batch_match_one_process():
    """Two processes, each with every other sample of the global batch (as the distributed sampler deals them) and
    MethodModule.global_batch as `gather`: the running means and weights equal one process's on the whole batch."""
    torch.manual_seed(0)
    logits, t = 3 * torch.randn(12), torch.rand(12)
    ema = torch.linspace(0.5, 2.0, 4)
    whole, ema_whole = two_stage_weights("jensen_shannon", logits, t, ema, 0.5)
    pair = torch.stack([density_ratio(logits), t], dim=1)

    def gather(v):  # what every process gets from all_gather: the global batch in its order
        assert any(torch.equal(v, pair[r::2]) for r in range(2))
        return pair

    for r in range(2):
        got, ema_r = two_stage_weights("jensen_shannon", logits[r::2], t[r::2], ema, 0.5, gather=gather)
        torch.testing.assert_close(got, whole[r::2], rtol=0, atol=0)
        assert torch.equal(ema_r, ema_whole)
    local, ema_local = two_stage_weights("jensen_shannon", logits[0::2], t[0::2], ema, 0.5)
    assert not torch.allclose(local, whole[0::2]) and not torch.equal(ema_local, ema_whole)
