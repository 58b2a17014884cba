"""Tests of losses/distillation against exact references on Gaussian-mixture data (closed-form denoisers).

Stage-1 loss floor: the target y*(x_t, t, c, w) = D_u + w (D_c - D_u) is a deterministic function of the
student's inputs, so E ||s(x_t, t, c, w) - y*||^2 >= 0 with equality iff s = y*: the floor is ZERO (unlike the
denoising loss, whose floor is E Var[x0 | x_t]). A student with the wrong scale w' has x0 error exactly
(w' - w) (D_c - D_u), so its loss is known in closed form too.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from guidance.denoiser import Denoiser
from guidance.guided import GuidedDenoiser, teacher_target
from guidance.guiders import build_guider
from guidance.parameterization import Prediction, from_x0
from guidance.samplers import ddim_step
from guidance.schedules import VPCosine, _bcast
from losses.distillation import (LOSS_SPACES, WEIGHTINGS, guidance_distillation_loss, loss_weight, progressive_target,
                                 sample_guidance_scale, space_factor)
from tests.guidance.gmm import GaussianMixture, gmm_denoiser


class ExactGuidedStudent(nn.Module):
    """The stage-1 optimum for a GaussianMixture teacher: net(x_t, net_time, {"cond": labels, "w": w}) returns,
    in `parameterization`, the CFG prediction D_u + w (D_c - D_u) of the exact posterior means (the "uncond"
    branch uses `negative_label` when given). `w_offset` makes a deliberately wrong student (scale w + offset).
    Its `conditioner` takes the mixture's class ids, as a class-conditional network adapter's does."""

    def __init__(self, gmm: GaussianMixture, schedule, parameterization: str = "eps", negative_label: int | None = None,
                 w_offset: float = 0.0):
        super().__init__()
        from models.conditioning import ClassConditioner

        self.gmm, self.schedule, self.parameterization = gmm, schedule, parameterization
        self.negative_label, self.w_offset = negative_label, w_offset
        self.conditioner = ClassConditioner(int(gmm.classes.max()) + 1)

    def forward(self, x_t, net_time, cond):
        t = torch.as_tensor(net_time, dtype=x_t.dtype) / self.schedule.time_scale
        a, s = self.schedule.alpha_sigma(t)
        labels = cond["cond"]
        neg = torch.full_like(labels, -1 if self.negative_label is None else self.negative_label)
        c = self.gmm.posterior_mean(x_t, a, s, labels)
        u = self.gmm.posterior_mean(x_t, a, s, neg)
        w = _bcast(cond["w"] + self.w_offset, x_t)
        return from_x0(u + w * (c - u), x_t, _bcast(a, x_t), _bcast(s, x_t), self.parameterization)

    def null_cond(self, cond):
        return {"cond": torch.full_like(cond["cond"], -1), "w": cond["w"]}


def gaussian_batch(b: int = 64, seed: int = 0, t_range=(0.02, 0.98)):
    """(gmm, schedule, x_t, t, labels, w) in float64; x_t noised from GMM samples."""
    gmm = GaussianMixture.random(num_classes=3, per_class=2, shape=(1, 3, 3), seed=seed)
    sched = VPCosine()
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, 3, (b,), generator=g)
    x0 = gmm.sample(labels, g)
    t = (t_range[0] + (t_range[1] - t_range[0]) * torch.rand(b, generator=g)).double()
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    w = sample_guidance_scale(b, 1.0, 6.0, generator=g).double()
    return gmm, sched, sched.add_noise(x0, eps, t), t, labels, w


@pytest.mark.parametrize("negative_label", [None, 2])
def test_stage1_target_is_the_closed_form_guided_prediction(negative_label):
    gmm, sched, x_t, t, labels, w = gaussian_batch()
    teacher = GuidedDenoiser(gmm_denoiser(gmm, sched, "v"), build_guider("cfg"))
    neg = None if negative_label is None else torch.full_like(labels, negative_label)
    target = teacher_target(teacher, x_t, t, labels, w, space="x0", neg_cond=neg)
    a, s = sched.alpha_sigma(t)
    c = gmm.posterior_mean(x_t, a, s, labels)
    u = gmm.posterior_mean(x_t, a, s, torch.full_like(labels, -1) if neg is None else neg)
    expected = u + _bcast(w, x_t) * (c - u)
    torch.testing.assert_close(target, expected, rtol=0, atol=1e-10)
    assert (target - c).abs().amax() > 1e-2  # guidance changes the prediction: the check can fail


@pytest.mark.parametrize("space", LOSS_SPACES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_student_at_the_optimum_reaches_the_zero_floor_and_a_wrong_w_the_analytic_loss(space, weighting):
    gmm, sched, x_t, t, labels, w = gaussian_batch()
    target = teacher_target(GuidedDenoiser(gmm_denoiser(gmm, sched, "v"), build_guider("cfg")), x_t, t, labels, w)
    cond = {"cond": labels, "w": w}
    optimum = Denoiser(ExactGuidedStudent(gmm, sched, "eps"), sched, "eps")(x_t, t, cond)
    floor = guidance_distillation_loss(optimum, target, space, weighting)
    assert floor.shape == (64,) and floor.dtype == torch.float64
    assert floor.max() < 1e-18

    wrong = Denoiser(ExactGuidedStudent(gmm, sched, "v", w_offset=0.5), sched, "v")(x_t, t, cond)
    loss = guidance_distillation_loss(wrong, target, space, weighting)
    a, s = sched.alpha_sigma(_bcast(t, x_t))
    c = gmm.posterior_mean(x_t, a.flatten(), s.flatten(), labels)
    u = gmm.posterior_mean(x_t, a.flatten(), s.flatten(), torch.full_like(labels, -1))
    scale = loss_weight(weighting, a, s) * space_factor(space, a, s)
    expected = (scale * (0.5 * (c - u)) ** 2).flatten(1).mean(1)  # x0 error (w' - w)(D_c - D_u)
    torch.testing.assert_close(loss, expected, rtol=1e-8, atol=1e-14)
    assert loss.max() > 1e-3


@pytest.mark.parametrize("space", ["eps", "v"])
def test_loss_in_a_space_is_the_mse_of_that_parameterisation(space):
    gmm, sched, x_t, t, labels, w = gaussian_batch(t_range=(0.2, 0.8))
    cond = {"cond": labels, "w": w}
    target = Denoiser(ExactGuidedStudent(gmm, sched, "v"), sched, "v")(x_t, t, cond)
    pred = Denoiser(ExactGuidedStudent(gmm, sched, "v", w_offset=-0.3), sched, "v")(x_t, t, cond)
    direct = (pred.read(space) - target.read(space)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(guidance_distillation_loss(pred, target.x0, space, "none"), direct, rtol=1e-9, atol=1e-14)
    if space == "v":  # on a VP schedule, v MSE = (1 + SNR) x0 MSE (Salimans & Ho 2022, sec. 4)
        torch.testing.assert_close(guidance_distillation_loss(pred, target.x0, "x0", "snr_plus_one"), direct,
                                   rtol=1e-9, atol=1e-14)


def test_loss_weights():
    a, s = torch.tensor([0.6, 0.8, 0.99]).double(), torch.tensor([0.8, 0.6, math.sqrt(1 - 0.99**2)]).double()
    snr = a**2 / s**2
    assert torch.equal(loss_weight("none", a, s), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(loss_weight("snr", a, s), snr)
    torch.testing.assert_close(loss_weight("snr_trunc", a, s), torch.stack([torch.tensor(1.0).double(), snr[1], snr[2]]))
    torch.testing.assert_close(loss_weight("snr_plus_one", a, s), 1 + snr)
    torch.testing.assert_close(space_factor("eps", a, s), snr)
    with pytest.raises(ValueError, match="snr_trunc"):
        loss_weight("snr_truncated", a, s)
    with pytest.raises(ValueError, match="x0, eps, v"):
        space_factor("flow", a, s)


def test_guidance_scale_distributions():
    g = torch.Generator().manual_seed(0)
    w = sample_guidance_scale(20000, 1.0, 6.0, "uniform", g)
    assert w.min() >= 1.0 and w.max() <= 6.0 and abs(w.mean().item() - 3.5) < 0.05
    lw = sample_guidance_scale(20000, 1.0, 8.0, "log_uniform", g)
    assert lw.min() >= 1.0 and lw.max() <= 8.0 + 1e-5
    assert abs(lw.log().mean().item() - math.log(8.0) / 2) < 0.02  # log w uniform on [0, log 8]
    with pytest.raises(ValueError, match="log_uniform"):
        sample_guidance_scale(3, 1.0, 2.0, "gamma")


def test_progressive_target_lands_on_two_exact_ddim_steps():
    """Salimans & Ho 2022, Algorithm 2: one DDIM step with x0 = x~ from z_t reaches the teacher's z_t''."""
    gmm = GaussianMixture.random(num_classes=3, per_class=2, shape=(1, 3, 3), seed=3)
    sched = VPCosine()
    guided = GuidedDenoiser(gmm_denoiser(gmm, sched, "v"), build_guider("cfg"))
    fine = sched.sampling_times(8)                     # teacher grid, 8 steps
    ext = torch.cat([fine, torch.tensor([-1.0]).double()])  # -1: the final step reaches clean data
    step = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])      # student steps (every other teacher point), incl. the last
    t, t_mid, t_next = ext[2 * step], ext[2 * step + 1], ext[2 * step + 2]
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 3, (8,), generator=g)
    w = torch.linspace(1.0, 5.0, 8).double()
    x_t = sched.add_noise(gmm.sample(labels, g), torch.randn(8, 1, 3, 3, generator=g, dtype=torch.float64), t)

    p1 = guided(x_t, t, labels, w)
    x_mid = ddim_step(p1, x_t, t_mid, sched)
    x_next = ddim_step(guided(x_mid, t_mid, labels, w), x_mid, t_next, sched)

    a_t, s_t = sched.alpha_sigma(_bcast(t, x_t))
    clean = _bcast(t_next, x_t) < 0
    a_n, s_n = sched.alpha_sigma(_bcast(t_next.clamp(min=0), x_t))
    a_n, s_n = torch.where(clean, torch.ones_like(a_n), a_n), torch.where(clean, torch.zeros_like(s_n), s_n)
    target = progressive_target(x_t, x_next, a_t, s_t, a_n, s_n)
    one_step = ddim_step(Prediction.from_x0(target, x_t, a_t, s_t), x_t, t_next, sched)
    assert (one_step - x_next).abs().max() < 1e-10
    torch.testing.assert_close(target[clean.flatten()], x_next[clean.flatten()], rtol=0, atol=1e-12)
    # the teacher's own one-step x0 does not get there: two steps are not one step of the teacher
    assert (ddim_step(p1, x_t, t_next, sched) - x_next).abs().max() > 1e-3
