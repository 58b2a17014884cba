"""Noise schedules: closed-form alpha/sigma values, diffusers parity, grids, derivatives, training times."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from guidance.schedules import (
    EDM,
    SCHEDULES,
    RectifiedFlow,
    VPCosine,
    VPCosineContinuous,
    VPLinear,
    VPLinearContinuous,
)

T = 1000
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012)  # Stable Diffusion's scaled_linear


def all_schedules():
    return {
        "vp_linear": VPLinear(),
        "vp_scaled_linear": VPLinear(scaled=True, **SD_BETAS),
        "vp_cosine": VPCosine(),
        "vp_linear_continuous": VPLinearContinuous(),
        "vp_cosine_continuous": VPCosineContinuous(),
        "rectified_flow": RectifiedFlow(),
        "rectified_flow_shift3": RectifiedFlow(shift=3.0),
        "edm": EDM(),
    }


VP_NAMES = ["vp_linear", "vp_scaled_linear", "vp_cosine", "vp_linear_continuous", "vp_cosine_continuous"]
ALL_NAMES = list(all_schedules())


def interior_t(schedule, n=101):
    """float64 times strictly inside [t_min, t_max] (endpoints may have sigma = 0 or alpha = 0)."""
    lo, hi = schedule.t_min, schedule.t_max
    return torch.linspace(lo, hi, n + 2, dtype=torch.float64)[1:-1]


# ---------------------------------------------------------------- discrete DDPM schedules (Ho et al. 2020)

def numpy_alpha_bar(betas: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - betas)


def numpy_cosine_betas(n=T, s=0.008, max_beta=0.999):
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731  Nichol & Dhariwal Eq. 17
    return np.array([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)])


@pytest.mark.parametrize("schedule, betas", [
    (VPLinear(), np.linspace(1e-4, 0.02, T)),
    (VPLinear(scaled=True, **SD_BETAS), np.linspace(0.00085**0.5, 0.012**0.5, T) ** 2),
    (VPCosine(), numpy_cosine_betas()),
], ids=["linear", "scaled_linear", "cosine"])
def test_discrete_grid_alpha_bar_is_cumulative_product_of_one_minus_beta(schedule, betas):
    """At t = i / (T - 1), alpha^2 = prod_{j<=i} (1 - beta_j), computed independently with numpy."""
    t = torch.arange(T, dtype=torch.float64) / (T - 1)
    a, s = schedule.alpha_sigma(t)
    ab = numpy_alpha_bar(betas)
    np.testing.assert_allclose(a.numpy() ** 2, ab, rtol=1e-10, atol=0)
    np.testing.assert_allclose(s.numpy() ** 2, 1 - ab, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(schedule.betas().numpy(), betas, rtol=1e-12, atol=1e-15)


def test_discrete_hand_values_at_first_and_second_step():
    s = VPLinear()
    a0 = s.alpha(torch.tensor([0.0], dtype=torch.float64)).item()
    a1 = s.alpha(torch.tensor([1 / 999], dtype=torch.float64)).item()
    beta1 = 1e-4 + (0.02 - 1e-4) / 999
    assert a0 == pytest.approx(math.sqrt(1 - 1e-4), rel=1e-13)
    assert a1 == pytest.approx(math.sqrt((1 - 1e-4) * (1 - beta1)), rel=1e-13)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_discrete_grid_matches_diffusers_ddpm_alphas_cumprod(beta_schedule):
    """Grid points reproduce diffusers' DDPMScheduler.alphas_cumprod. diffusers builds betas and their
    cumulative product in float32, so agreement is to float32 accumulation error (1000 products,
    ~1e-7 relative each, measured <= 1.4e-5 relative for the tiny tail of the cosine schedule)."""
    from diffusers import DDPMScheduler  # local construction, no download

    if beta_schedule == "linear":
        ours, kw = VPLinear(), dict(beta_start=1e-4, beta_end=0.02)
    elif beta_schedule == "scaled_linear":
        ours, kw = VPLinear(scaled=True, **SD_BETAS), SD_BETAS
    else:
        ours, kw = VPCosine(), {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, **kw)
    t = torch.arange(T, dtype=torch.float64) / (T - 1)
    np.testing.assert_allclose(ours.alpha(t).numpy() ** 2, ref.alphas_cumprod.double().numpy(), rtol=5e-5, atol=0)
    np.testing.assert_allclose(ours.betas().numpy(), ref.betas.double().numpy(), rtol=2e-6, atol=1e-9)


def test_discrete_log_snr_is_linear_between_grid_points():
    s = VPLinear()
    i, frac = 417, 0.3
    grid = s.log_snr(torch.tensor([i / 999, (i + 1) / 999], dtype=torch.float64))
    mid = s.log_snr(torch.tensor([(i + frac) / 999], dtype=torch.float64))
    assert mid.item() == pytest.approx(((1 - frac) * grid[0] + frac * grid[1]).item(), rel=1e-12)
    # alpha, sigma follow from the interpolated log-SNR: alpha^2 = sigmoid(lambda)
    a = s.alpha(torch.tensor([(i + frac) / 999], dtype=torch.float64)).item()
    assert a**2 == pytest.approx(1 / (1 + math.exp(-mid.item())), rel=1e-12)


def test_discrete_net_time_is_the_timestep_index():
    s = VPLinear()
    t = torch.tensor([0.0, 1 / 999, 500 / 999, 1.0], dtype=torch.float64)
    torch.testing.assert_close(s.net_time(t), torch.tensor([0.0, 1.0, 500.0, 999.0], dtype=torch.float64))
    assert RectifiedFlow().net_time(torch.tensor(0.25)).item() == pytest.approx(250.0)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 10, 25, 50, 100, 333, 999, 1000])
def test_discrete_trailing_grid_equals_diffusers_ddim_trailing(steps):
    """DDIM "trailing" spacing (Lin et al. 2024, Table 2): diffusers timesteps / (T - 1)."""
    from diffusers import DDIMScheduler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    ref.set_timesteps(steps)
    ours = VPLinear().sampling_times(steps)
    assert ours.shape == (steps,)
    torch.testing.assert_close(ours, ref.timesteps.double() / (T - 1), rtol=0, atol=1e-12)
    assert ours[0].item() == 1.0  # trailing starts at the last training step


def test_discrete_sample_t_lies_on_the_training_grid():
    s = VPCosine()
    t = s.sample_t(4000, generator=torch.Generator().manual_seed(0))
    idx = t.double() * (T - 1)
    torch.testing.assert_close(idx, idx.round(), rtol=0, atol=1e-3)
    assert idx.min() >= 0 and idx.max() <= T - 1
    assert len(torch.unique(idx.round())) > 900  # covers the grid, not a single step


# ---------------------------------------------------------------- continuous schedules, closed forms

def test_vp_linear_continuous_hand_values():
    """log alpha(t) = -(beta_min t + (beta_max - beta_min) t^2 / 2) / 2 (Song et al. 2021, Eq. 33)."""
    s = VPLinearContinuous()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    expected = [1.0, math.exp(-0.5 * (0.1 * 0.5 + 0.5 * 19.9 * 0.25)), math.exp(-0.5 * (0.1 + 0.5 * 19.9))]
    np.testing.assert_allclose(s.alpha(t).numpy(), expected, rtol=1e-13)
    np.testing.assert_allclose(s.sigma(t).numpy(), np.sqrt(1 - np.array(expected) ** 2), rtol=1e-12, atol=1e-15)


def test_vp_cosine_continuous_hand_values():
    s = VPCosineContinuous()
    c0 = math.cos(math.pi / 2 * 0.008 / 1.008)
    t = torch.tensor([0.0, 0.5, s.t_max], dtype=torch.float64)
    expected = [1.0, math.cos(math.pi / 2 * 0.508 / 1.008) / c0, math.cos(math.pi / 2 * (s.t_max + 0.008) / 1.008) / c0]
    np.testing.assert_allclose(s.alpha(t).numpy(), expected, rtol=1e-13)
    assert s.sigma(t)[0].item() == pytest.approx(0.0, abs=1e-7)
    assert 0 < expected[2] < 0.01  # t_max keeps alpha positive but near zero


def test_rectified_flow_alpha_sigma_and_shift_formula():
    """alpha = 1 - t, sigma = t; shift: t' = s t / (1 + (s - 1) t) (Esser et al. 2024, Eq. 23)."""
    t = torch.tensor([0.0, 0.2, 0.5, 1.0], dtype=torch.float64)
    for sch in (RectifiedFlow(), RectifiedFlow(shift=3.0)):  # shift changes the grid, not the path
        torch.testing.assert_close(sch.alpha(t), 1 - t, rtol=0, atol=0)
        torch.testing.assert_close(sch.sigma(t), t, rtol=0, atol=0)
    grid = RectifiedFlow(shift=3.0).sampling_times(4)
    torch.testing.assert_close(grid, torch.tensor([1.0, 0.9, 0.75, 0.5], dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(RectifiedFlow().sampling_times(4), torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64))
    # training times: the same uniform draws pushed through the shift
    u = torch.rand(1000, generator=torch.Generator().manual_seed(3))
    t_shift = RectifiedFlow(shift=3.0).sample_t(1000, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(t_shift, 3 * u / (1 + 2 * u))
    assert t_shift.mean() > 0.6  # shift > 1 moves time toward noise (uniform mean is 0.5)


def test_rectified_flow_logit_normal_training_times():
    z = torch.randn(2000, generator=torch.Generator().manual_seed(4))
    t = RectifiedFlow(logit_normal=True).sample_t(2000, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(t, torch.sigmoid(z))


@pytest.mark.parametrize("shift", [0.0, -1.0])
def test_rectified_flow_rejects_non_positive_shift(shift):
    with pytest.raises(ValueError, match="shift must be > 0"):
        RectifiedFlow(shift=shift)


def test_edm_sigma_endpoints_inverse_and_karras_grid():
    """sigma_i = (smax^(1/rho) + i/N (smin^(1/rho) - smax^(1/rho)))^rho (Karras et al. 2022, Eq. 5)."""
    s = EDM()
    ends = s.sigma(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(ends, torch.tensor([0.002, 80.0], dtype=torch.float64), rtol=1e-13, atol=0)
    torch.testing.assert_close(s.alpha(torch.rand(7, dtype=torch.float64)), torch.ones(7, dtype=torch.float64))
    sig = torch.logspace(-2.5, 1.8, 50, dtype=torch.float64)
    torch.testing.assert_close(s.sigma(s.t_of_sigma(sig)), sig, rtol=1e-12, atol=0)
    n = 18
    grid_sigma = s.sigma(s.sampling_times(n))
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    karras = torch.tensor([(hi + i / n * (lo - hi)) ** 7 for i in range(n)], dtype=torch.float64)
    torch.testing.assert_close(grid_sigma, karras, rtol=1e-12, atol=0)


def test_edm_training_sigma_is_log_normal():
    """ln sigma ~ N(p_mean, p_std^2) (Karras et al. 2022, Table 1), clamped to [sigma_min, sigma_max].
    With 20000 draws the median of ln sigma has standard error 1.25 * 1.2 / sqrt(20000) = 0.011."""
    s = EDM()
    t = s.sample_t(20000, generator=torch.Generator().manual_seed(5))
    ln_sigma = torch.log(s.sigma(t.double()))
    assert abs(ln_sigma.median().item() - (-1.2)) < 0.06
    inner = ln_sigma[(ln_sigma > math.log(0.01)) & (ln_sigma < math.log(20))]
    assert abs(inner.std().item() - 1.2) < 0.1


# ---------------------------------------------------------------- properties common to every schedule

@pytest.mark.parametrize("name", VP_NAMES)
def test_vp_schedules_preserve_variance(name):
    s = all_schedules()[name]
    t = torch.cat([interior_t(s, 997), torch.tensor([s.t_min, s.t_max], dtype=torch.float64)])
    a, sg = s.alpha_sigma(t)
    torch.testing.assert_close(a**2 + sg**2, torch.ones_like(t), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_sigma_increases_alpha_decreases_log_snr_decreases(name):
    s = all_schedules()[name]
    t = interior_t(s, 1999)
    a, sg = s.alpha_sigma(t)
    assert (sg.diff() > 0).all(), "sigma must increase with t"
    assert (a.diff() <= 0).all(), "alpha must not increase with t"
    assert (s.log_snr(t).diff() < 0).all(), "log-SNR must decrease with t"
    assert ((a >= 0) & (a <= 1) & (sg > 0)).all()


@pytest.mark.parametrize("name", [n for n in ALL_NAMES if n != "edm"])
def test_endpoints_are_data_and_noise(name):
    s = all_schedules()[name]
    a0, s0 = s.alpha_sigma(torch.tensor([0.0], dtype=torch.float64))
    a1, s1 = s.alpha_sigma(torch.tensor([s.t_max], dtype=torch.float64))
    assert a0.item() > 0.9995 and s0.item() < 0.03  # discrete: sigma(0)^2 = beta_0 (0.00085 for SD)
    assert a1.item() < 0.07 and s1.item() > 0.99  # scaled_linear ends at alpha = 0.068 (no zero terminal SNR)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_log_snr_is_twice_log_alpha_over_sigma(name):
    s = all_schedules()[name]
    t = interior_t(s, 50)
    a, sg = s.alpha_sigma(t)
    torch.testing.assert_close(s.log_snr(t), 2 * torch.log(a / sg), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_d_alpha_sigma_matches_central_finite_differences(name):
    """Points are chosen off the discrete grid (log-SNR is piecewise linear there) and h stays inside
    one grid cell; central differences in float64 are accurate to ~h^2 + 1e-16 / h."""
    s = all_schedules()[name]
    t = ((torch.arange(3, 990, 41, dtype=torch.float64) + 0.37) / 999).clamp(s.t_min + 1e-4, s.t_max - 1e-4)
    h = 1e-7
    da, ds = s.d_alpha_sigma(t)
    a_p, s_p = s.alpha_sigma(t + h)
    a_m, s_m = s.alpha_sigma(t - h)
    fd_a, fd_s = (a_p - a_m) / (2 * h), (s_p - s_m) / (2 * h)
    scale = max(fd_a.abs().max().item(), fd_s.abs().max().item(), 1.0)
    torch.testing.assert_close(da, fd_a, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(ds, fd_s, rtol=1e-5, atol=1e-6 * scale)
    assert da.dtype == ds.dtype == torch.float64


def test_d_alpha_sigma_closed_forms_and_dtype():
    t = torch.tensor([0.1, 0.5, 0.9])
    da, ds = RectifiedFlow().d_alpha_sigma(t)
    torch.testing.assert_close(da, -torch.ones(3)), torch.testing.assert_close(ds, torch.ones(3))
    assert da.dtype == torch.float32  # returned in t's dtype
    e = EDM()
    td = t.double()
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    da, ds = e.d_alpha_sigma(td)
    torch.testing.assert_close(da, torch.zeros_like(td))
    torch.testing.assert_close(ds, 7 * (lo + td * (hi - lo)) ** 6 * (hi - lo), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("steps", [1, 2, 5, 37])
def test_sampling_times_shape_descending_and_in_range(name, steps):
    s = all_schedules()[name]
    grid = s.sampling_times(steps)
    assert grid.shape == (steps,)
    assert grid.dtype == torch.float64
    assert grid[0].item() == pytest.approx(s.t_max)
    assert (grid.diff() < 0).all()
    assert (grid > s.t_min - 1e-12).all() and (grid <= s.t_max + 1e-12).all()


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("steps", [0, -3])
def test_sampling_times_rejects_non_positive_steps(name, steps):
    with pytest.raises(ValueError, match=r"steps must be a positive integer, got " + str(steps)):
        all_schedules()[name].sampling_times(steps)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_sample_t_within_range(name):
    s = all_schedules()[name]
    t = s.sample_t(5000, generator=torch.Generator().manual_seed(1))
    assert t.shape == (5000,)
    assert t.min().item() >= s.t_min - 1e-7 and t.max().item() <= s.t_max + 1e-7
    assert t.std().item() > 0.05  # not collapsed to a point


def test_sample_t_is_reproducible_with_a_generator():
    for s in all_schedules().values():
        a = s.sample_t(64, generator=torch.Generator().manual_seed(9))
        b = s.sample_t(64, generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_add_noise_uses_per_sample_alpha_sigma(name):
    s = all_schedules()[name]
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = interior_t(s, 3)
    x_t = s.add_noise(x0, eps, t)
    for i in range(3):
        a, sg = s.alpha_sigma(t[i : i + 1])
        torch.testing.assert_close(x_t[i], a * x0[i] + sg * eps[i], rtol=1e-14, atol=1e-14)


def test_registry_and_describe():
    assert set(SCHEDULES) == {"vp_linear", "vp_cosine", "vp_linear_continuous", "vp_cosine_continuous",
                              "rectified_flow", "edm"}
    d = VPLinear(scaled=True, **SD_BETAS).describe()
    assert d["class"] == "VPLinear" and d["scaled"] is True and d["num_steps"] == T
    assert not any(k.startswith("_") for k in d)
    json.dumps(d)
    assert RectifiedFlow(shift=2.0).describe()["shift"] == 2.0
