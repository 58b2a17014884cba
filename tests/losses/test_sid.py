"""Tests of losses/sid.py: SiD's generator gradient against its closed form for Gaussians with exact teacher and fake
scores, its algebraic forms and normaliser, and SiD-LSG's guided fake-score loss."""
from __future__ import annotations

import math

import pytest
import torch

from guidance.guided import GuidedDenoiser
from guidance.guiders import CFG
from guidance.schedules import VPCosine
from losses.denoising import denoising_loss
from losses.sid import guided_denoising_loss, sid_generator_loss, sid_normalizer
from tests.guidance.gmm import GaussianMixture, gmm_denoiser
from tests.losses.test_dmd import D, SHAPE, exact_moment_normals, gaussian


def closed_form_grad(mu, s, mu_p, s_p, alpha_t, sigma_t, alpha):
    """d/d(mu_q, s_q) of E[L], L = (f_p - f_q) . ((f_p - x) - alpha (f_p - f_q)), x = mu_q + s_q z, x_t = a x + sigma eps,
    with the exact posterior means f_p (teacher N(mu_p, s_p^2 I)) and f_q (fake score N(mu, s^2 I), its parameters
    frozen at the current generator), both differentiated through x_t. Derived by hand:

    f_p = k_p x_t + (1 - a k_p) mu_p, k_p = a s_p^2 / v_p, v_p = a^2 s_p^2 + sigma^2 (f_q likewise with mu, s), so
    delta = f_p - f_q = dk x_t + c (dk = k_p - k_q, c = (1 - a k_p) mu_p - (1 - a k_q) mu) and
    r = f_p - x = (1 - a k_p)(mu_p - x) + k_p sigma eps. With m_d = dk a mu_q + c, m_r = (1 - a k_p)(mu_p - mu_q):
      E[L] = m_d . m_r + D dk (k_p sigma^2 - a s_q^2 (1 - a k_p)) - alpha (|m_d|^2 + D dk^2 (a^2 s_q^2 + sigma^2)),
      dE/dmu_q = dk a m_r - (1 - a k_p) m_d - 2 alpha dk a m_d,
      dE/ds_q  = -2 D dk a s_q (1 - a k_p) - 2 alpha D dk^2 a^2 s_q,    at (mu_q, s_q) = (mu, s)."""
    a, sig = alpha_t, sigma_t
    k_p = a * s_p**2 / (a**2 * s_p**2 + sig**2)
    k_q = a * s**2 / (a**2 * s**2 + sig**2)
    dk = k_p - k_q
    c = (1 - a * k_p) * mu_p - (1 - a * k_q) * mu
    m_d = dk * a * mu + c
    m_r = (1 - a * k_p) * (mu_p - mu)
    g_mu = dk * a * m_r - (1 - a * k_p) * m_d - 2 * alpha * dk * a * m_d
    g_s = -2 * D * dk * a * s * (1 - a * k_p) - 2 * alpha * D * dk**2 * a**2 * s
    return g_mu, g_s


def sid_gradient(mu_q0, s_q0, mu_p, s_p, t, alpha, n=64):
    """Autograd of losses.sid on exact-moment samples (the integrand is a polynomial of degree 2 in (z, eps), so the
    sample mean is the expectation exactly): d/d(mu_q, s_q) of E[L]."""
    mu_q = mu_q0.clone().requires_grad_(True)
    s_q = s_q0.clone().requires_grad_(True)
    sched = VPCosine()
    a, sig = (v.double() for v in sched.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
    zeta = exact_moment_normals(n, 2 * D, seed=3)
    z, eps = zeta[:, :D].reshape(n, *SHAPE), zeta[:, D:].reshape(n, *SHAPE)
    x = mu_q.reshape(1, *SHAPE) + s_q * z
    x_t = a * x + sig * eps  # WITH gradient: SiD differentiates through both scores at x_t
    av, sv = torch.full((n,), a.item(), dtype=torch.float64), torch.full((n,), sig.item(), dtype=torch.float64)
    d_real = gaussian(mu_p, s_p).posterior_mean(x_t, av, sv)
    d_fake = gaussian(mu_q0, s_q0).posterior_mean(x_t, av, sv)  # the fake score: frozen at the current generator
    loss = sid_generator_loss(x, d_real, d_fake, alpha, normalize=False).sum() * D / n  # per-sample loss: CHW mean
    return torch.autograd.grad(loss, (mu_q, s_q)), (a, sig)


MU_P, S_P = torch.tensor([0.5, -1.0, 0.2, 1.5], dtype=torch.float64), 0.7


@pytest.mark.parametrize("alpha", [1.2, 1.0, 0.5])
@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_sid_gradient_equals_the_closed_form_for_gaussians_with_exact_scores(t, alpha):
    mu_q, s_q = torch.tensor([-0.3, 0.4, 0.9, 1.0], dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    (g_mu, g_s), (a, sig) = sid_gradient(mu_q, s_q, MU_P, S_P, t, alpha)
    e_mu, e_s = closed_form_grad(mu_q, s_q, MU_P, S_P, a, sig, alpha)
    assert torch.allclose(g_mu, e_mu, rtol=1e-9, atol=1e-12)
    assert torch.allclose(g_s, e_s, rtol=1e-9, atol=1e-12)


def test_detaching_the_scores_changes_the_gradient():
    """The authors take f_phi and f_psi with gradient through x_t; a stop-gradient implementation would not agree."""
    mu_q, s_q = torch.tensor([-0.3, 0.4, 0.9, 1.0], dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    (g_mu, _), (a, sig) = sid_gradient(mu_q, s_q, MU_P, S_P, 0.5, 1.2)
    n = 64
    mu = mu_q.clone().requires_grad_(True)
    zeta = exact_moment_normals(n, 2 * D, seed=3)
    z, eps = zeta[:, :D].reshape(n, *SHAPE), zeta[:, D:].reshape(n, *SHAPE)
    x = mu.reshape(1, *SHAPE) + s_q * z
    x_t = (a * x + sig * eps).detach()
    av, sv = torch.full((n,), a.item(), dtype=torch.float64), torch.full((n,), sig.item(), dtype=torch.float64)
    d_real, d_fake = gaussian(MU_P, S_P).posterior_mean(x_t, av, sv), gaussian(mu_q, s_q).posterior_mean(x_t, av, sv)
    (g_detached,) = torch.autograd.grad(sid_generator_loss(x, d_real, d_fake, 1.2, normalize=False).sum(), (mu,))
    assert not torch.allclose(g_mu, g_detached * D / n, rtol=1e-3)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_the_gradient_vanishes_when_the_generator_matches_the_teacher(t):
    (g_mu, g_s), _ = sid_gradient(MU_P.clone(), torch.tensor(S_P, dtype=torch.float64), MU_P, S_P, t, 1.2)
    assert g_mu.abs().max() < 1e-12 and abs(g_s.item()) < 1e-12


def test_descending_the_sid_gradient_pulls_a_gaussian_generator_to_the_teacher():
    """Gradient steps on (mu_q, s_q) with the fake score re-fitted exactly each step (a perfect fake-score update)."""
    mu_q, s_q = torch.tensor([-0.3, 0.4, 0.9, 1.0], dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    start = (mu_q - MU_P).norm().item(), abs(s_q.item() - S_P)
    for _ in range(300):
        t = 0.05 + 0.9 * torch.rand((), generator=gen, dtype=torch.float64).item()
        (g_mu, g_s), _ = sid_gradient(mu_q, s_q, MU_P, S_P, t, 1.2, n=16)
        mu_q, s_q = mu_q - 0.5 * g_mu, s_q - 0.05 * g_s
    assert (mu_q - MU_P).norm().item() < 0.02 * start[0]
    assert abs(s_q.item() - S_P) < 0.05 * start[1]


def test_the_loss_is_the_authors_forms_with_a_detached_floored_normaliser():
    g = torch.Generator().manual_seed(0)
    x, real, fake = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    diff = real - fake
    # SiD sid_loss.py line 55 and, at alpha = 1, SiD-LSG sid_training_loop.py line 526
    for alpha in (1.2, 1.0, 0.5):
        expected = ((1 - alpha) * diff**2 + diff * (fake - x)).flatten(1).mean(1)
        assert torch.allclose(sid_generator_loss(x, real, fake, alpha, normalize=False), expected)
    assert torch.allclose(sid_generator_loss(x, real, fake, 1.0, normalize=False),
                          (diff * (fake - x)).flatten(1).mean(1))
    w = (x - real).abs().flatten(1).mean(1).detach()
    assert torch.allclose(sid_normalizer(x, real).flatten(), w)
    loss = sid_generator_loss(x, real, fake, 1.2)
    assert torch.allclose(loss, sid_generator_loss(x, real, fake, 1.2, normalize=False) / w)
    # the normaliser carries no gradient: d/dx equals that of the unnormalised loss divided by the constant w
    gx = torch.autograd.grad(loss.sum(), x)[0]
    gx_ref = torch.autograd.grad((sid_generator_loss(x, real, fake, 1.2, normalize=False) / w).sum(), x)[0]
    assert torch.allclose(gx, gx_ref)
    same = x.detach()
    assert torch.allclose(sid_normalizer(same, same), torch.full((3, 1, 1, 1), 1e-5, dtype=torch.float64))


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
@pytest.mark.parametrize("scale", [1.0, 2.0, 4.5])
def test_guided_fake_score_loss_is_the_denoising_loss_of_the_cfg_prediction(parameterization, scale):
    """SiD-LSG's kappa_1: the fake score's guided output D_u + kappa (D_c - D_u), read in the network's own
    parameterisation, regressed on its exact target; kappa 1 is the plain denoising loss."""
    gmm = GaussianMixture.random(num_classes=3, per_class=1, shape=(1, 3, 3), seed=2)
    sched = VPCosine()
    den = gmm_denoiser(gmm, sched, parameterization)
    g = torch.Generator().manual_seed(1)
    x = gmm.sample(torch.tensor([0, 1, 2, 1]), generator=g)
    labels = torch.tensor([0, 1, -1, 2])  # one dropped label: both branches are the null condition
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    loss = guided_denoising_loss(den, x, labels, t, eps, scale)
    a, s = sched.alpha_sigma(t.reshape(-1, 1, 1, 1))
    x_t = a * x + s * eps
    guided = GuidedDenoiser(den, CFG())(x_t, t, labels, scale)
    target = {"eps": eps, "x0": x, "v": a * eps - s * x}[parameterization]
    expected = (guided.read(parameterization) - target).pow(2).flatten(1).mean(1)
    assert torch.allclose(loss.double(), expected, rtol=1e-5, atol=1e-7)
    if scale == 1.0:
        assert torch.equal(loss, denoising_loss(den, x, labels, t, eps))
    den.net.calls.clear()
    guided_denoising_loss(den, x, labels, t, eps, scale)
    assert den.net.calls == [(8 if scale != 1.0 else 4, None)]  # cond and null branches in one batched forward
    assert math.isfinite(loss.sum().item())
