"""Tests of losses/dmd.py and losses/gan.py: the DMD gradient against the analytic reverse-KL gradient
of Gaussians, its normaliser, Decoupled DMD's split, the fake-score loss, and the GAN terms."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from guidance.denoiser import Denoiser
from guidance.schedules import VPCosine
from losses.denoising import denoising_loss
from losses.dmd import (decoupled_dmd_grad, decoupled_dmd_loss, dmd_grad, dmd_loss, dmd_normalizer,
                        fake_score_loss, surrogate_loss)
from losses.gan import discriminator_loss, generator_gan_loss
from tests.guidance.gmm import GaussianMixture

SHAPE = (1, 2, 2)  # d = 4 pixels
D = math.prod(SHAPE)


def gaussian(mu, s) -> GaussianMixture:
    """N(mu, s^2 I) on SHAPE as a one-component mixture (closed-form posterior means at every noise level)."""
    mu = torch.as_tensor(mu, dtype=torch.float64).reshape(1, D)
    return GaussianMixture(mu, torch.as_tensor([float(s)], dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                           torch.zeros(1), SHAPE)


def exact_moment_normals(n: int, dims: int, seed: int = 0) -> torch.Tensor:
    """n x dims samples whose empirical mean is exactly 0 and (1/n) sum z z^T exactly I (float64).

    Expectations of polynomials of degree <= 2 over them equal the Gaussian expectations exactly."""
    z = torch.randn(n, dims, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(z.T @ z / n)
    return z @ torch.linalg.inv(chol).T


def reverse_kl(mu_q, s_q, mu_p, s_p, alpha, sigma):
    """KL(q_t || p_t) for q_t = N(alpha mu_q, v_q I), p_t = N(alpha mu_p, v_p I), v = alpha^2 s^2 + sigma^2."""
    v_q, v_p = alpha**2 * s_q**2 + sigma**2, alpha**2 * s_p**2 + sigma**2
    return 0.5 * (D * v_q / v_p - D + D * torch.log(v_p / v_q) + (alpha**2) * ((mu_q - mu_p) ** 2).sum() / v_p)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_dmd_gradient_equals_the_analytic_reverse_kl_gradient_of_gaussians(t):
    # Generator x = mu_q + s_q z. With s(x_t) = (alpha D - x_t)/sigma^2, grad KL(q_t||p_t) =
    # E[alpha (s_q - s_p) . dx/dtheta] = E[alpha^2/sigma^2 (D_fake - D_real) . dx/dtheta] (VSD Eq. 11),
    # i.e. the un-normalised DMD gradient with time weight alpha^2/sigma^2. The integrand is a polynomial of
    # degree <= 2 in (z, eps), so exact-moment samples make the expectation exact.
    mu_p, s_p = torch.tensor([0.5, -1.0, 0.2, 1.5], dtype=torch.float64), 0.7
    mu_q = torch.tensor([-0.3, 0.4, 0.9, 1.0], dtype=torch.float64, requires_grad=True)
    s_q = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    sched = VPCosine()
    alpha, sigma = (v.double() for v in sched.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
    n = 64
    zeta = exact_moment_normals(n, 2 * D, seed=1)
    z, eps = zeta[:, :D].reshape(n, *SHAPE), zeta[:, D:].reshape(n, *SHAPE)
    x = mu_q.reshape(1, *SHAPE) + s_q * z
    x_t = alpha * x.detach() + sigma * eps
    a, s = torch.full((n,), alpha.item(), dtype=torch.float64), torch.full((n,), sigma.item(), dtype=torch.float64)
    d_real = gaussian(mu_p, s_p).posterior_mean(x_t, a, s)
    d_fake = gaussian(mu_q.detach(), s_q.detach()).posterior_mean(x_t, a, s)
    weight = torch.full((n,), (alpha**2 / sigma**2).item() * D / n, dtype=torch.float64)  # E = (1/n) sum; loss is a CHW mean
    loss = dmd_loss(x, d_real, d_fake, weight=weight, normalize=False).sum()
    g_mu, g_s = torch.autograd.grad(loss, (mu_q, s_q))
    kl = reverse_kl(mu_q, s_q, mu_p, s_p, alpha, sigma)
    e_mu, e_s = torch.autograd.grad(kl, (mu_q, s_q))
    assert torch.allclose(g_mu, e_mu, rtol=1e-10, atol=1e-12)
    assert torch.allclose(g_s, e_s, rtol=1e-10, atol=1e-12)
    # hand form of the analytic gradient, as a check of the reference itself
    v_q, v_p = alpha**2 * s_q**2 + sigma**2, alpha**2 * s_p**2 + sigma**2
    assert torch.allclose(e_mu, alpha**2 * (mu_q - mu_p) / v_p)
    assert torch.allclose(e_s, D * alpha**2 * s_q * (1 / v_p - 1 / v_q))


def test_normalised_dmd_drives_a_gaussian_generator_to_the_teacher():
    # With exact scores the DMD update is zero only when q = p; its normaliser and random t keep that fixed point.
    torch.manual_seed(0)
    mu_p, s_p = torch.tensor([0.5, -1.0, 0.2, 1.5], dtype=torch.float64), 0.7
    mu_q = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    log_s = torch.tensor(math.log(1.5), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([mu_q, log_s], lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 if i < 250 else 0.1)
    sc = VPCosine()
    for _ in range(400):
        n = 128
        z, eps = torch.randn(n, *SHAPE, dtype=torch.float64), torch.randn(n, *SHAPE, dtype=torch.float64)
        t = 0.02 + 0.96 * torch.rand(n, dtype=torch.float64)
        a, s = sc.alpha_sigma(t)
        x = mu_q.reshape(1, *SHAPE) + log_s.exp() * z
        x_t = a.reshape(-1, 1, 1, 1) * x.detach() + s.reshape(-1, 1, 1, 1) * eps
        d_real = gaussian(mu_p, s_p).posterior_mean(x_t, a, s)
        d_fake = gaussian(mu_q.detach(), log_s.exp().detach()).posterior_mean(x_t, a, s)
        opt.zero_grad()
        dmd_loss(x, d_real, d_fake).mean().backward()
        opt.step()
        sched.step()
    assert torch.allclose(mu_q.detach(), mu_p, atol=0.05)
    assert abs(log_s.exp().item() - s_p) < 0.05


def test_normaliser_is_the_per_sample_mean_absolute_error_in_float32_and_detached():
    x = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]], dtype=torch.bfloat16)
    d_real = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]], [[[1.0, 2.0], [-3.0, 2.0]]]], dtype=torch.bfloat16)
    n = dmd_normalizer(x, d_real)
    assert n.dtype == torch.float32 and n.shape == (2, 1, 1, 1)
    assert torch.allclose(n.flatten(), torch.tensor([2.5 / 4, 8.0 / 4]))
    d_fake = d_real + 1
    g = dmd_grad(x, d_real, d_fake)
    assert g.dtype == torch.float32
    assert torch.allclose(g, torch.ones_like(g) / n)
    # no gradient flows through the normaliser or the predictions: d loss / dx = g / (C H W) exactly,
    # even when the predictions are built from x with grad
    xf = torch.randn(3, *SHAPE, requires_grad=True)
    d_real_f, d_fake_f = 0.5 * xf, 0.5 * xf + xf**2
    loss = dmd_loss(xf, d_real_f, d_fake_f)
    (grad,) = torch.autograd.grad(loss.sum(), xf)
    expected = (xf**2) / (0.5 * xf).abs().flatten(1).mean(1).reshape(-1, 1, 1, 1) / D
    assert torch.allclose(grad, expected.detach(), rtol=1e-6)
    assert torch.allclose(loss, 0.5 * (expected.detach() * D).pow(2).flatten(1).mean(1), rtol=1e-6)


def test_normaliser_is_floored_when_the_teacher_reproduces_the_sample():
    x = torch.zeros(2, *SHAPE)
    assert torch.isfinite(dmd_grad(x, x, x + 1)).all()


def test_surrogate_weight_scales_each_sample_gradient():
    x = torch.randn(3, *SHAPE, requires_grad=True)
    g = torch.randn(3, *SHAPE)
    w = torch.tensor([0.0, 1.0, 2.5])
    (grad,) = torch.autograd.grad(surrogate_loss(x, g, w).sum(), x)
    assert torch.allclose(grad, w.reshape(-1, 1, 1, 1) * g / D)


def test_decoupled_dmd_with_one_time_and_shared_normaliser_is_dmd():
    gen = torch.Generator().manual_seed(0)
    x, d_c, d_u, d_fake = (torch.randn(5, *SHAPE, generator=gen, dtype=torch.float64) for _ in range(4))
    w = torch.tensor([1.0, 2.0, 3.5, -1.0, 0.0], dtype=torch.float64)
    d_real = d_u + w.reshape(-1, 1, 1, 1) * (d_c - d_u)
    norm = dmd_normalizer(x, d_real)
    g = decoupled_dmd_grad(x, d_c, d_u, w, d_fake, d_c, ca_norm=norm, dm_norm=norm)
    assert torch.allclose(g, dmd_grad(x, d_real, d_fake), rtol=1e-12, atol=1e-12)
    # default normalisers: CA against D_cfg, DM against D_c; the weights scale each term alone
    ca_only = decoupled_dmd_grad(x, d_c, d_u, w, d_fake, d_c, ca_weight=2.0, dm_weight=0.0)
    assert torch.allclose(ca_only, -2.0 * (w.reshape(-1, 1, 1, 1) - 1) * (d_c - d_u) / norm)
    dm_only = decoupled_dmd_grad(x, d_c, d_u, w, d_fake, d_c, ca_weight=0.0, dm_weight=0.5)
    assert torch.allclose(dm_only, 0.5 * (d_fake - d_c) / dmd_normalizer(x, d_c))
    # w = 1 (pure conditional teacher): no CFG augmentation at all
    assert torch.allclose(decoupled_dmd_grad(x, d_c, d_u, 1.0, d_fake, d_c, dm_weight=0.0), torch.zeros_like(x))
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(decoupled_dmd_loss(xg, d_c, d_u, w, d_fake, d_c).sum(), xg)
    assert torch.allclose(grad, decoupled_dmd_grad(x, d_c, d_u, w, d_fake, d_c) / D)


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)

    def forward(self, x, t, cond):
        return self.conv(x) * (1 + t.reshape(-1, 1, 1, 1) / 1000)


def test_fake_score_loss_is_the_denoising_loss_on_detached_samples():
    den = Denoiser(_Linear(), VPCosine(), "v")
    x = torch.randn(4, *SHAPE, requires_grad=True)
    t, eps = torch.rand(4), torch.randn(4, *SHAPE)
    loss = fake_score_loss(den, x, None, t, eps)
    assert torch.equal(loss, denoising_loss(den, x.detach(), None, t, eps))
    grads = torch.autograd.grad(loss.sum(), [x, den.net.conv.weight], allow_unused=True)
    assert grads[0] is None and grads[1] is not None and grads[1].abs().sum() > 0


def test_gan_terms_match_hand_values():
    fake = torch.tensor([0.0, 2.0, -1.0])
    real = torch.tensor([1.0, -3.0])
    assert torch.allclose(generator_gan_loss(fake), torch.tensor([math.log(2), math.log1p(math.exp(-2)), math.log1p(math.e)]))
    expected = (math.log(2) + math.log1p(math.exp(2)) + math.log1p(math.exp(-1))) / 3 \
        + (math.log1p(math.exp(-1)) + math.log1p(math.exp(3))) / 2
    assert discriminator_loss(fake, real).item() == pytest.approx(expected, rel=1e-6)
    # the minimiser over one logit l for real/fake densities p, q is log(p / q)
    l = torch.zeros((), requires_grad=True)
    p, q = 0.3, 0.1
    opt = torch.optim.LBFGS([l], max_iter=50)

    def closure():
        opt.zero_grad()
        loss = q * F.softplus(l) + p * F.softplus(-l)
        loss.backward()
        return loss
    opt.step(closure)
    assert l.item() == pytest.approx(math.log(p / q), abs=1e-4)
