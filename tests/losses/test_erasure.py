"""Erasure targets and preservation terms against closed-form Gaussian-mixture denoisers: ESD = the guidance core
at w = -eta = the analytic combination, ANT's early-stage target and window, erase-toward, and the frozen-prediction
preservation targets."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from guidance.denoiser import Denoiser
from guidance.guided import GuidedDenoiser, teacher_target
from guidance.guiders import CFG
from guidance.parameterization import from_x0
from guidance.schedules import VPCosine
from losses.erasure import (ant_early_target, ant_target, esd_target, forget_target, preservation_target,
                            regression_loss, toward_target, window_scale, windowed)
from tests.guidance.gmm import GaussianMixture, GMMNet, gmm_denoiser

SCHEDULE = VPCosine()
B = 6


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture.random(num_classes=3, per_class=2, shape=(2, 3, 3), seed=1)


def inputs(gmm, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([0.05, 0.2, 0.4, 0.55, 0.75, 0.95], dtype=torch.float64)
    x0 = gmm.sample(torch.tensor([0, 1, 2, 0, 1, 2]), generator=g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_t = SCHEDULE.add_noise(x0, eps, t)
    c = torch.tensor([0, 2, 1, 1, 0, 2])
    return x_t, t, c


def analytic(gmm, x_t, t, labels, space):
    """The exact prediction E[x0 | x_t, y] read in `space` (eps, x0, v, flow)."""
    a, s = SCHEDULE.alpha_sigma(t)
    x0 = gmm.posterior_mean(x_t, a, s, labels)
    shape = (-1, 1, 1, 1)
    return from_x0(x0, x_t, a.reshape(shape), s.reshape(shape), space)


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=0, atol=tol)


NULL = lambda c: torch.full_like(c, -1)  # noqa: E731


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
@pytest.mark.parametrize("space", ["eps", "x0", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0, 2.5])
def test_esd_target_is_the_guidance_core_at_minus_eta_and_the_analytic_combination(gmm, kind, space, eta):
    den = gmm_denoiser(gmm, SCHEDULE, kind)
    x_t, t, c = inputs(gmm)
    got = esd_target(den, x_t, t, c, eta, space)
    core = teacher_target(GuidedDenoiser(den, CFG()), x_t, t, c, -eta, space)
    assert torch.equal(got, core)
    y_c, y_u = analytic(gmm, x_t, t, c, space), analytic(gmm, x_t, t, NULL(c), space)
    close(got, y_u - eta * (y_c - y_u))  # Gandikota et al. 2023, Eq. 6


def test_esd_target_takes_per_sample_eta(gmm):
    den = gmm_denoiser(gmm, SCHEDULE, "eps")
    x_t, t, c = inputs(gmm)
    eta = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0, 1.0], dtype=torch.float64)
    got = esd_target(den, x_t, t, c, eta, "eps")
    y_c, y_u = analytic(gmm, x_t, t, c, "eps"), analytic(gmm, x_t, t, NULL(c), "eps")
    close(got, y_u - eta.reshape(-1, 1, 1, 1) * (y_c - y_u))
    assert not torch.allclose(got, esd_target(den, x_t, t, c, 1.0, "eps"))


def test_window_scale_reverses_guidance_only_at_or_below_the_threshold():
    t = torch.tensor([0.0, 0.3, 0.5, 0.50001, 1.0])
    assert window_scale(t, 2.0, 0.5).tolist() == [-2.0, -2.0, -2.0, 2.0, 2.0]  # ANT: +eta early
    assert window_scale(t, 2.0, 0.5, early_scale=1.0).tolist() == [-2.0, -2.0, -2.0, 1.0, 1.0]  # the earlier w = 1


@pytest.mark.parametrize("kind", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.5, 1.0, 2.0])
def test_ant_early_target_keeps_the_frozen_guidance_direction(gmm, kind, eta):
    """ANT (arXiv 2504.12782; the authors' loss_1): e_0 + eta (e_p - e_0), exact on the GMM teacher in eps space
    whatever the network predicts; at eta = 1 it is the frozen conditional prediction, otherwise it is not."""
    den = gmm_denoiser(gmm, SCHEDULE, kind)
    x_t, t, c = inputs(gmm)
    got = ant_early_target(den, x_t, t, c, eta, "eps")
    e_p, e_0 = analytic(gmm, x_t, t, c, "eps"), analytic(gmm, x_t, t, NULL(c), "eps")
    close(got, e_0 + eta * (e_p - e_0))
    assert torch.allclose(got, e_p, rtol=0, atol=1e-10) == (eta == 1.0)
    close(got, teacher_target(GuidedDenoiser(den, CFG()), x_t, t, c, eta, "eps"))  # the guidance core at w = +eta


@pytest.mark.parametrize("space", ["eps", "v"])
def test_ant_target_is_esd_inside_the_window_and_the_early_target_outside(gmm, space):
    den = gmm_denoiser(gmm, SCHEDULE, "v")
    x_t, t, c = inputs(gmm)
    t_window = 0.5
    got = ant_target(den, x_t, t, c, eta=1.5, t_window=t_window, space=space)
    inside = t <= t_window
    assert 0 < int(inside.sum()) < B
    close(got[inside], esd_target(den, x_t, t, c, 1.5, space)[inside])
    y_c, y_u = analytic(gmm, x_t, t, c, space), analytic(gmm, x_t, t, NULL(c), space)
    close(got[inside], (y_u - 1.5 * (y_c - y_u))[inside])
    close(got[~inside], (y_u + 1.5 * (y_c - y_u))[~inside])  # ANT: the frozen guidance direction kept early
    close(got[~inside], ant_early_target(den, x_t, t, c, 1.5, space)[~inside])
    old = ant_target(den, x_t, t, c, eta=1.5, t_window=t_window, space=space, early_scale=1.0)
    close(old[~inside], y_c[~inside])  # early_scale 1: the frozen conditional prediction (the earlier target)
    close(old[inside], got[inside])


def test_toward_target_is_the_frozen_prediction_for_the_target_class(gmm):
    den = gmm_denoiser(gmm, SCHEDULE, "eps")
    x_t, t, a = inputs(gmm)
    b = (a + 1) % 3
    close(toward_target(den, x_t, t, b, 1.0, "eps"), analytic(gmm, x_t, t, b, "eps"))
    y_b, y_a, y_u = (analytic(gmm, x_t, t, y, "x0") for y in (b, a, NULL(a)))
    close(toward_target(den, x_t, t, b, 3.0, "x0"), y_u + 3.0 * (y_b - y_u))  # guided toward B
    close(toward_target(den, x_t, t, b, 3.0, "x0", source_cond=a), y_a + 3.0 * (y_b - y_a))  # and away from A


def test_windowed_picks_per_sample():
    t = torch.tensor([0.1, 0.9, 0.5])
    inside, outside = torch.zeros(3, 2, 2), torch.ones(3, 2, 2)
    assert windowed(inside, outside, t, 0.5)[:, 0, 0].tolist() == [0.0, 1.0, 0.0]
    assert windowed(inside, outside, t, None) is inside


@pytest.mark.parametrize("space", ["eps", "x0", "v", "flow"])
def test_preservation_targets_are_the_frozen_unconditional_and_anchor_predictions(gmm, space):
    den = gmm_denoiser(gmm, SCHEDULE, "v")
    x_t, t, c = inputs(gmm)
    close(preservation_target(den, x_t, t, NULL(c), space), analytic(gmm, x_t, t, NULL(c), space))  # All but One
    close(preservation_target(den, x_t, t, c, space), analytic(gmm, x_t, t, c, space))  # SPM anchors
    assert not torch.allclose(analytic(gmm, x_t, t, NULL(c), space), analytic(gmm, x_t, t, c, space))


@pytest.mark.parametrize("space", ["x0", "eps"])
def test_forget_target_is_esd_for_erased_labels_and_the_guided_teacher_for_the_others(gmm, space):
    den = gmm_denoiser(gmm, SCHEDULE, "v")
    guided = GuidedDenoiser(den, CFG())
    x_t, t, c = inputs(gmm)  # labels 0, 2, 1, 1, 0, 2
    w = torch.tensor([2.0, 3.0, 1.5, 2.0, 4.0, 2.0], dtype=torch.float64)
    erased = c == 1
    got = forget_target(guided, x_t, t, c, w, erased, eta=1.5, space=space)
    close(got[erased], esd_target(den, x_t, t, c, 1.5, space)[erased])  # SFD: the erased score (ESD, w = -eta)
    close(got[~erased], teacher_target(guided, x_t, t, c, w, space)[~erased])
    y_c, y_u = analytic(gmm, x_t, t, c, space), analytic(gmm, x_t, t, NULL(c), space)
    want = torch.where(erased.reshape(-1, 1, 1, 1), y_u - 1.5 * (y_c - y_u), y_u + w.reshape(-1, 1, 1, 1) * (y_c - y_u))
    close(got, want)
    close(forget_target(guided, x_t, t, c, w, torch.zeros_like(erased), space=space),
          teacher_target(guided, x_t, t, c, w, space))


def test_forget_target_toward_is_the_guided_target_class_at_each_samples_scale(gmm):
    den = gmm_denoiser(gmm, SCHEDULE, "eps")
    guided = GuidedDenoiser(den, CFG())
    x_t, t, c = inputs(gmm)
    w = torch.tensor([2.0, 3.0, 1.5, 2.0, 4.0, 2.0], dtype=torch.float64)
    to = torch.tensor([0, 2, 0])[c]  # 1 -> 2, 2 -> 0, 0 stays
    erased = c != 0
    got = forget_target(guided, x_t, t, c, w, erased, safe=to[erased], space="x0")
    y_to, y_u = analytic(gmm, x_t, t, to, "x0"), analytic(gmm, x_t, t, NULL(c), "x0")
    close(got, y_u + w.reshape(-1, 1, 1, 1) * (y_to - y_u))
    assert not torch.allclose(got, teacher_target(guided, x_t, t, c, w, "x0"))


class Scaled(nn.Module):
    """A GMMNet times a trainable scale: a frozen model with parameters, to check that targets carry no grad."""

    def __init__(self, gmm):
        super().__init__()
        self.inner = GMMNet(gmm, SCHEDULE, "eps")
        self.scale = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, x, t, cond):
        return self.inner(x, t, cond) * self.scale

    def null_cond(self, cond):
        return torch.full_like(cond, -1)


def test_targets_carry_no_gradient_and_the_loss_is_per_sample(gmm):
    den = Denoiser(Scaled(gmm), SCHEDULE, "eps")
    x_t, t, c = inputs(gmm)
    targets = [esd_target(den, x_t, t, c), ant_target(den, x_t, t, c), toward_target(den, x_t, t, (c + 1) % 3, 2.0),
               preservation_target(den, x_t, t, c)]
    assert not any(y.requires_grad for y in targets)
    pred = den(x_t, t, c).read("eps")
    loss = regression_loss(pred, targets[0])
    assert loss.shape == (B,) and loss.requires_grad
    close(loss, ((pred - targets[0]) ** 2).flatten(1).mean(1).float(), tol=1e-6)
    assert regression_loss(targets[3], preservation_target(den, x_t, t, c)).abs().max() == 0
