"""guidance.samplers.sample_until, a sampler's trajectory stopped after k steps: the whole run is `sample`, a partial run
is the first k DDIM steps (Song et al. 2021, Eq. 12), closed form for a point mass; helpers from test_samplers."""
from __future__ import annotations

import pytest
import torch

from guidance.guided import GuidedDenoiser
from guidance.guiders import build_guider
from guidance.samplers import ddim_step, sample, sample_until
from guidance.schedules import EDM, RectifiedFlow, VPCosineContinuous, VPLinear
from tests.guidance.test_samplers import MU, POINT_MASS, guided_for, noise


def gmm_guided(schedule, guider="cfg", **params):
    """A CFG-guided exact denoiser of a 3-class Gaussian mixture on [2, 3, 3] images, labels [6], w [6]."""
    from tests.guidance.gmm import GaussianMixture, gmm_denoiser

    gmm = GaussianMixture.random(num_classes=3, per_class=2, shape=(2, 3, 3), seed=3)
    guided = GuidedDenoiser(gmm_denoiser(gmm, schedule, "v"), build_guider(guider, **params))
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    return guided, z, torch.tensor([0, 1, 2, 0, 1, 2]), torch.linspace(1.0, 6.0, 6, dtype=torch.float64)


@pytest.mark.parametrize("sampler, eta, guider", [("ddim", 0.0, "cfg"), ("ddim", 0.7, "cfg"), ("euler", 0.0, "cfg"),
                                                  ("dpmpp_2m", 0.0, "cfg"), ("ddim", 0.0, "apg")])
@pytest.mark.parametrize("schedule", [VPLinear(), RectifiedFlow(shift=3.0)], ids=["VPLinear", "RF-shift3"])
def test_sample_until_the_last_step_is_sample(schedule, sampler, eta, guider):
    """stop = steps (and the default) runs the whole trajectory: bit for bit `sample` (ancestral noise from the same
    generator, stateful APG momentum included), at the clean-data marker t = -1."""
    guided, z, labels, w = gmm_guided(schedule, guider)
    ref = sample(guided, z, labels, w, 5, sampler, eta=eta, generator=torch.Generator().manual_seed(9))
    for stop in (5, None):
        x, t = sample_until(guided, z, labels, w, 5, stop, sampler, eta=eta, generator=torch.Generator().manual_seed(9))
        assert torch.equal(x, ref) and torch.equal(t, torch.full((6,), -1.0, dtype=torch.float64))


@pytest.mark.parametrize("schedule", [VPLinear(), RectifiedFlow(shift=3.0), EDM()], ids=["VPLinear", "RF-shift3", "EDM"])
def test_sample_until_a_partial_run_is_the_first_k_ddim_steps(schedule):
    """stop = k: exactly k guided DDIM steps (Song et al. 2021, Eq. 12) from the scaled noise, at t = times[k];
    stop = 0 is the scaled noise itself, with no network evaluation."""
    guided, z, labels, w = gmm_guided(schedule)
    times = schedule.sampling_times(6).to(torch.float64)
    a0, s0 = schedule.alpha_sigma(times[:1])
    x = z * (a0**2 + s0**2).sqrt()
    for k in range(6):
        guided.nfe = 0
        got, t = sample_until(guided, z, labels, w, 6, k)
        assert torch.equal(got, x) and torch.equal(t, times[k].expand(6)), k
        assert guided.nfe == 2 * k  # CFG: two branches per step
        pred = guided(x, times[k].expand(6), labels, w)
        x = ddim_step(pred, x, times[k + 1].expand(6) if k + 1 < 6 else torch.full((6,), -1.0, dtype=torch.float64),
                      schedule)


@pytest.mark.parametrize("schedule", [VPLinear(), VPCosineContinuous(), RectifiedFlow(shift=3.0)],
                         ids=["VPLinear", "VPCosineC", "RF-shift3"])
def test_sample_until_is_exact_for_a_point_mass(schedule):
    """Data at mu (s = 0): E[x0 | x_t] = mu, so DDIM keeps eps fixed and x at times[k] is, in closed form,
    alpha_k mu + sigma_k (x_T - alpha_T mu) / sigma_T with x_T the scaled noise."""
    g, _ = guided_for(schedule, "x0", std=POINT_MASS)  # x0 output: eps at alpha = 0 (flow at t = 1) has no x0
    z = noise(4)
    times = schedule.sampling_times(8).to(torch.float64)
    a, s = schedule.alpha_sigma(times)
    x_T = z * (a[0] ** 2 + s[0] ** 2).sqrt()
    for k in (1, 3, 7):
        x, t = sample_until(g, z, None, 1.0, 8, k)
        torch.testing.assert_close(x, a[k] * MU + s[k] * (x_T - a[0] * MU) / s[0], rtol=0, atol=1e-12)
        assert torch.equal(t, times[k].expand(4))


@pytest.mark.parametrize("stop", [-1, 5, 2.5])
def test_sample_until_refuses_a_stop_outside_the_grid(stop):
    g, _ = guided_for(VPLinear())
    with pytest.raises(ValueError, match=r"stop must be a step index in 0\.\.4"):
        sample_until(g, noise(2), None, 1.0, 4, stop)
