"""Score Forgetting Distillation's target (losses.erasure.forget_target) against a closed-form Gaussian mixture: the
forgotten class's score overridden by the SAFE class's (the guided teacher's prediction for the safe class), per
concept or per sample, and every other sample's target the guided teacher's own."""
from __future__ import annotations

import pytest
import torch

from guidance.guided import GuidedDenoiser, teacher_target
from guidance.guiders import CFG
from guidance.parameterization import from_x0
from guidance.schedules import VPCosine
from losses.erasure import forget_target
from tests.guidance.gmm import GaussianMixture, gmm_denoiser

SCHEDULE = VPCosine()


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture.random(num_classes=4, per_class=2, shape=(2, 3, 3), seed=3)


def batch(gmm):
    """x_t [8, 2, 3, 3] around samples of every class, times, labels and per-sample scales (float64)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3, 1, 2, 1, 0])
    x0 = gmm.sample(labels, generator=g)
    t = torch.linspace(0.05, 0.95, 8, dtype=torch.float64)
    x_t = SCHEDULE.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t)
    w = torch.tensor([2.0, 3.0, 1.5, 2.0, 4.0, 2.5, 1.0, 3.0], dtype=torch.float64)
    return x_t, t, labels, w


def exact(gmm, x_t, t, labels, space):
    """E[x0 | x_t, y] read in `space` (labels -1: unconditional)."""
    a, s = SCHEDULE.alpha_sigma(t)
    return from_x0(gmm.posterior_mean(x_t, a, s, labels), x_t, a.reshape(-1, 1, 1, 1), s.reshape(-1, 1, 1, 1), space)


def guided_exact(gmm, x_t, t, labels, w, space):
    """The CFG teacher's exact prediction D_u + w (D_y - D_u) for labels y."""
    y, u = exact(gmm, x_t, t, labels, space), exact(gmm, x_t, t, torch.full_like(labels, -1), space)
    return u + w.reshape(-1, 1, 1, 1) * (y - u)


@pytest.mark.parametrize("space", ["x0", "eps"])
def test_safe_target_is_the_teachers_guided_prediction_for_the_safe_class(gmm, space):
    guided = GuidedDenoiser(gmm_denoiser(gmm, SCHEDULE, "v"), CFG())
    x_t, t, labels, w = batch(gmm)
    forgotten = labels == 1
    got = forget_target(guided, x_t, t, labels, w, forgotten, safe=torch.full((int(forgotten.sum()),), 3), space=space)
    safe = torch.where(forgotten, 3, labels)  # SFD: s_teacher(x_t, c_f) <- s_teacher(x_t, c_safe)
    torch.testing.assert_close(got, guided_exact(gmm, x_t, t, safe, w, space), rtol=0, atol=1e-10)
    own = guided_exact(gmm, x_t, t, labels, w, space)
    assert not torch.allclose(got[forgotten], own[forgotten])  # the override changes the forgotten rows only
    torch.testing.assert_close(got[~forgotten], own[~forgotten], rtol=0, atol=1e-10)


def test_a_safe_class_per_sample_reads_only_the_forgotten_rows(gmm):
    """A safe class per forgotten sample (SFD's random pseudo-label per sample): forgotten rows get their own safe
    class, the other rows the plain guided target."""
    guided = GuidedDenoiser(gmm_denoiser(gmm, SCHEDULE, "eps"), CFG())
    x_t, t, labels, w = batch(gmm)  # labels 0, 1, 2, 3, 1, 2, 1, 0; forget 1 and 2
    per_sample = torch.tensor([1, 0, 1, 2, 3, 0, 3, 2])  # junk in unerased rows (even erased classes)
    forgotten = torch.isin(labels, torch.tensor([1, 2]))
    got = forget_target(guided, x_t, t, labels, w, forgotten, safe=per_sample[forgotten], space="x0")
    safe = torch.where(forgotten, per_sample, labels)
    torch.testing.assert_close(got, guided_exact(gmm, x_t, t, safe, w, "x0"), rtol=0, atol=1e-10)
    plain = teacher_target(guided, x_t, t, labels, w, "x0")
    assert torch.equal(got[~forgotten], plain[~forgotten])
