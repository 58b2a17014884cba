"""Samplers against the exact denoiser of Gaussian data: moments, exact ODE maps, convergence,
parameterisation independence and validation.

Data: x0 ~ N(mu, s^2) per coordinate. Then x_t = alpha x0 + sigma eps ~ N(alpha mu, v_t^2) with
v_t^2 = alpha^2 s^2 + sigma^2, and the exact denoiser is
    E[x0 | x_t] = mu + alpha s^2 / v_t^2 (x_t - alpha mu).
The probability-flow ODE maps the marginals into each other monotonically, so for this 1-D Gaussian
its flow is the affine map  x_{t'} = alpha' mu + (v_{t'} / v_t) (x_t - alpha mu).

DDIM with eta = 0 is Euler in (x / alpha, sigma / alpha) (Song et al. 2021; Karras et al. 2022, sec. 3):
one step is exact iff E[x0 | x_t] is constant along the trajectory. Along the exact flow
x_t - alpha mu = v_t z with z fixed, so E[x0 | x_t] = mu + alpha s^2 z / v_t changes with t unless
s = 0: DDIM is exact in one step for a point mass (and so is DPM-Solver++, whose data-prediction
steps reduce to DDIM when x0 is constant), and first-order convergent for s > 0.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from guidance.denoiser import Denoiser
from guidance.guided import GuidedDenoiser
from guidance.guiders import build_guider
from guidance.samplers import SAMPLERS, check_sampler, ddim_step, dpmpp_2m_step, euler_step, sample
from guidance.schedules import EDM, RectifiedFlow, VPCosine, VPCosineContinuous, VPLinear, VPLinearContinuous

KINDS = ("eps", "x0", "v", "flow", "edm")
MU = torch.tensor([0.5, -0.8], dtype=torch.float64)
STD = torch.tensor([0.6, 1.3], dtype=torch.float64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small elementwise work on a shared 2-core machine runs faster (and steadier) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class GaussianNet(nn.Module):
    """The exact denoiser of N(mu, std^2) data, emitting the raw output of parameterisation `kind`.

    Input x_in [B, D] (EDM-scaled when kind == "edm"), net_time [B]; returns [B, D]. Raw outputs are
    written from the papers' definitions, independently of guidance.parameterization.
    """

    def __init__(self, schedule, kind, mu=MU, std=STD, sigma_data=0.5):
        super().__init__()
        self.schedule, self.kind, self.mu, self.std, self.sd = schedule, kind, mu, std, sigma_data
        self.calls = 0

    def forward(self, x_in, net_time, cond):
        self.calls += 1
        t = net_time / self.schedule.time_scale
        a, g = self.schedule.alpha_sigma(t)
        a, g = a[:, None], g[:, None]
        se = g / a
        x = x_in * a * torch.sqrt(se**2 + self.sd**2) if self.kind == "edm" else x_in  # undo c_in
        x0 = self.mu + a * self.std**2 / (a**2 * self.std**2 + g**2) * (x - a * self.mu)
        eps = (x - a * x0) / g
        if self.kind == "eps":
            return eps
        if self.kind == "x0":
            return x0
        if self.kind == "v":
            return a * eps - g * x0  # Salimans & Ho 2022
        if self.kind == "flow":
            return eps - x0
        c_skip = self.sd**2 / (se**2 + self.sd**2)  # Karras et al. 2022, Table 1
        c_out = se * self.sd / torch.sqrt(se**2 + self.sd**2)
        return (x0 - c_skip * x / a) / c_out

    def null_cond(self, cond):
        return cond


def guided_for(schedule, kind="x0", std=STD, guider="conditional"):
    net = GaussianNet(schedule, kind, std=std)
    return GuidedDenoiser(Denoiser(net, schedule, kind), build_guider(guider)), net


def run(schedule, kind, sampler, steps, noise, eta=0.0, seed=0, std=STD):
    g, _ = guided_for(schedule, kind, std)
    return sample(g, noise, None, 1.0, steps, sampler, eta=eta, generator=torch.Generator().manual_seed(seed))


def v_t(a, g, std=STD):
    return torch.sqrt(a**2 * std**2 + g**2)


def exact_flow(x, t, t_next, schedule, std=STD):
    """The probability-flow ODE solution from (x, t) to t_next for N(MU, std^2) data; x [B, D], t scalar."""
    a, g = schedule.alpha_sigma(torch.tensor([t], dtype=torch.float64))
    a2, g2 = schedule.alpha_sigma(torch.tensor([t_next], dtype=torch.float64))
    return a2 * MU + v_t(a2, g2, std) / v_t(a, g, std) * (x - a * MU)


def ideal_moments(schedule, std=STD):
    """Mean and std of the exact ODE's output when started, as `sample` does, from x = k z with
    k = sqrt(alpha_T^2 + sigma_T^2) (the std of x_T for unit-variance data, diffusers' init_noise_sigma).

    The prior mismatch (the true x_T has mean alpha_T mu and std v_T) leaves
    mean = mu - s alpha_T mu / v_T and std = s k / v_T; exact for RectifiedFlow (alpha_T = 0).
    """
    a, g = schedule.alpha_sigma(schedule.sampling_times(1).reshape(1))
    v = v_t(a, g, std)
    return MU - std * a * MU / v, std * (a**2 + g**2).sqrt() / v


def affine_map(schedule, kind, sampler, steps, std=STD):
    """A deterministic sampler on Gaussian data is affine per coordinate: x = A z + B. Returns (A, B)."""
    out = run(schedule, kind, sampler, steps, torch.stack([torch.zeros(2), torch.ones(2)]).double(), std=std)
    return out[1] - out[0], out[0]


def noise(n, seed=1234):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- moments of the generated data

N_SAMPLES = 40_000
# Statistical tolerance: for n i.i.d. samples the sample mean has standard error s / sqrt(n) and the
# sample variance a relative standard error sqrt(2 / (n - 1)) (Gaussian output). 4.5 standard errors
# (two-sided false-alarm probability 7e-6 per check if the seed changed) plus the sampler's own
# deterministic bias, bounded per configuration below from the exact affine map (test further down).
Z = 4.5

DETERMINISTIC_CASES = [
    # (schedule, sampler, steps, bound on |A / ideal std - 1| i.e. the discretisation error in std,
    #  checked noise-free by the affine-map test; measured values are about 80% of each bound)
    (VPLinear(), "ddim", 200, 0.016),
    (VPCosine(), "ddim", 200, 0.009),
    (RectifiedFlow(), "ddim", 200, 0.009),
    (EDM(), "ddim", 200, 0.017),  # Karras' Euler in sigma
    (RectifiedFlow(), "euler", 200, 0.009),
    (RectifiedFlow(shift=3.0), "euler", 200, 0.016),
    (VPCosineContinuous(), "euler", 200, 0.002),
    (VPLinearContinuous(), "euler", 200, 0.003),
    (VPLinear(), "dpmpp_2m", 50, 0.004),
    (RectifiedFlow(), "dpmpp_2m", 50, 0.004),
    (EDM(), "dpmpp_2m", 50, 0.008),
]
CASE_IDS = [f"{type(s).__name__}{'-shift' if getattr(s, 'shift', 1) != 1 else ''}-{m}-{n}" for s, m, n, _ in DETERMINISTIC_CASES]
# the sampled (many-sample) checks run on a subset that still covers every sampler and schedule family
SAMPLED = ["VPCosine-ddim-200", "EDM-ddim-200", "RectifiedFlow-ddim-200", "RectifiedFlow-shift-euler-200",
           "VPCosineContinuous-euler-200", "VPLinear-dpmpp_2m-50", "EDM-dpmpp_2m-50"]
SAMPLED_CASES = [c for c, i in zip(DETERMINISTIC_CASES, CASE_IDS) if i in SAMPLED]


@pytest.mark.parametrize("schedule, sampler, steps, std_bound", SAMPLED_CASES, ids=SAMPLED)
def test_deterministic_sampler_reproduces_data_mean_and_variance(schedule, sampler, steps, std_bound):
    x = run(schedule, "x0", sampler, steps, noise(N_SAMPLES))
    n = x.shape[0]
    ideal_mean, ideal_std = ideal_moments(schedule)
    mean_tol = Z * STD / math.sqrt(n) + (ideal_mean - MU).abs() + 0.005 * STD
    var_tol = Z * math.sqrt(2 / (n - 1)) + ((ideal_std / STD) ** 2 - 1).abs() + 2 * std_bound + std_bound**2
    assert ((x.mean(0) - MU).abs() <= mean_tol).all(), (x.mean(0), MU, mean_tol)
    assert ((x.var(0) / STD**2 - 1).abs() <= var_tol).all(), (x.var(0) / STD**2, var_tol)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("schedule, sampler, steps, std_bound", DETERMINISTIC_CASES, ids=CASE_IDS)
def test_deterministic_sampler_map_is_close_to_the_exact_ode_map(schedule, sampler, steps, std_bound):
    """Noise-free check of the same cases: the affine map x = A z + B against the exact ODE's."""
    A, B = affine_map(schedule, "x0", sampler, steps)
    ideal_mean, ideal_std = ideal_moments(schedule)
    assert ((B - ideal_mean).abs() <= 0.005 * STD).all(), (B, ideal_mean)
    assert ((A / ideal_std - 1).abs() <= std_bound).all(), (A / ideal_std - 1)


def ddim_moments(schedule, steps, eta, std=STD):
    """Mean and variance of DDIM's output, propagated exactly through the linear-Gaussian recursion.

    A step (Song et al. 2021, Eq. 12, in alpha/sigma form) with D = mu + k (x - a mu), k = a s^2 / v^2:
      x' = a' D + r (x - a D) / g + c z,  r = sqrt(g'^2 - c^2),  c = eta g' sqrt(1 - (a g' / (a' g))^2)
    so x' - a' mu = L (x - a mu) + c z with L = a' k + r (1 - a k) / g; the last step returns D.
    """
    times = schedule.sampling_times(steps)
    a, g = schedule.alpha_sigma(times)
    m, var = torch.zeros_like(MU), (a[0] ** 2 + g[0] ** 2) * torch.ones_like(MU)  # x_T = sqrt(a^2 + s^2) z
    for i in range(steps):
        k = a[i] * std**2 / v_t(a[i], g[i], std) ** 2
        if i + 1 == steps:
            return MU + k * (m - a[i] * MU), k**2 * var
        an, gn = a[i + 1], g[i + 1]
        c = eta * gn * torch.sqrt(1 - (a[i] * gn / (an * g[i])) ** 2)
        L = an * k + torch.sqrt(gn**2 - c**2) * (1 - a[i] * k) / g[i]
        m, var = an * MU + L * (m - a[i] * MU), L**2 * var + c**2


@pytest.mark.parametrize("schedule", [RectifiedFlow(), VPCosineContinuous()], ids=["RectifiedFlow", "VPCosineC"])
def test_ddim_eta1_ancestral_sampling_reproduces_data_moments(schedule):
    """eta = 1 (DDPM ancestral sampling) with the exact posterior mean misses O(1/N) of the variance
    per trajectory; the recursion above gives the expected output moments, which must (a) match the
    samples within the statistical tolerance and (b) approach the data as the step count grows."""
    steps = 150
    x = run(schedule, "flow" if isinstance(schedule, RectifiedFlow) else "eps", "ddim", steps, noise(N_SAMPLES), eta=1.0, seed=7)
    n = x.shape[0]
    m_pred, var_pred = ddim_moments(schedule, steps, eta=1.0)
    assert ((x.mean(0) - m_pred).abs() <= Z * STD / math.sqrt(n)).all(), (x.mean(0), m_pred)
    assert ((x.var(0) / var_pred - 1).abs() <= Z * math.sqrt(2 / (n - 1))).all(), (x.var(0), var_pred)
    # against the data: the recursion's bias (<= 5% in variance at 150 steps) plus the statistical part
    assert ((var_pred / STD**2 - 1).abs() < 0.05).all() and ((m_pred - MU).abs() < 0.01 * STD).all()
    assert ((x.var(0) / STD**2 - 1).abs() <= Z * math.sqrt(2 / (n - 1)) + 0.05).all()
    assert ((x.mean(0) - MU).abs() <= Z * STD / math.sqrt(n) + 0.01 * STD).all()


def test_ddim_eta1_few_steps_variance_matches_the_recursion():
    """At 8 steps the ancestral sampler's variance deficit is large, so this pins the injected noise c."""
    sch = VPCosineContinuous()
    x = run(sch, "v", "ddim", 8, noise(N_SAMPLES, seed=5), eta=1.0, seed=3)
    m_pred, var_pred = ddim_moments(sch, 8, eta=1.0)
    _, var_det = ddim_moments(sch, 8, eta=0.0)
    assert ((var_pred / STD**2) < 0.9).all() and ((var_pred - var_det).abs() > 0.05 * STD**2).all()
    n = x.shape[0]
    assert ((x.var(0) / var_pred - 1).abs() <= Z * math.sqrt(2 / (n - 1))).all(), (x.var(0), var_pred)
    assert ((x.mean(0) - m_pred).abs() <= Z * STD / math.sqrt(n)).all()


@pytest.mark.parametrize("schedule", [VPLinear(), RectifiedFlow(shift=3.0), EDM()], ids=["VPLinear", "RF-shift3", "EDM"])
def test_ddim_eta0_equals_the_exact_recursion(schedule):
    """The library's deterministic DDIM equals the scalar recursion written from the paper (eta = 0)."""
    A, B = affine_map(schedule, "eps" if not isinstance(schedule, RectifiedFlow) else "flow", "ddim", 30)
    m_pred, var_pred = ddim_moments(schedule, 30, eta=0.0)
    torch.testing.assert_close(B, m_pred, rtol=0, atol=1e-10)
    torch.testing.assert_close(A**2, var_pred, rtol=1e-9, atol=0)


# ---------------------------------------------------------------- exactness and convergence of single steps

def step_with(step_fn, schedule, kind, x, t, t_next, std=STD, state=None):
    """One sampler step from (x [B, D], t) to t_next through the GuidedDenoiser of the Gaussian net."""
    g, _ = guided_for(schedule, kind, std)
    b = x.shape[0]
    tt = torch.full((b,), t, dtype=torch.float64)
    pred = g(x, tt, None, 1.0)
    state = {} if state is None else state
    state["t"] = tt
    return step_fn(pred, x, torch.full((b,), t_next, dtype=torch.float64), schedule, state=state)


def integrate(step_fn, schedule, kind, x, t0, t1, k, std=STD):
    """k uniform-in-t steps of a sampler from t0 to t1 (state carried, as `sample` does)."""
    ts = torch.linspace(t0, t1, k + 1, dtype=torch.float64).tolist()
    state = {}
    for t, tn in zip(ts[:-1], ts[1:]):
        x = step_with(step_fn, schedule, kind, x, t, tn, std, state)
    return x


POINT_MASS = torch.zeros(2, dtype=torch.float64)
X_START = torch.tensor([[1.7, -0.4], [-2.2, 0.9], [0.3, 3.1]], dtype=torch.float64)
ALL_SCHEDULES = [VPLinear(), VPCosine(), VPLinearContinuous(), VPCosineContinuous(), RectifiedFlow(),
                 RectifiedFlow(shift=3.0), EDM()]
SCH_IDS = ["VPLinear", "VPCosine", "VPLinearC", "VPCosineC", "RF", "RF-shift3", "EDM"]


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=SCH_IDS)
@pytest.mark.parametrize("step_fn", [ddim_step, dpmpp_2m_step], ids=["ddim", "dpmpp_2m"])
def test_one_step_is_exact_for_a_point_mass(schedule, step_fn):
    """s = 0: E[x0 | x_t] = mu for all t, and DDIM / DPM-Solver++ steps are exact (module docstring)."""
    x = X_START * 5 if isinstance(schedule, EDM) else X_START
    out = step_with(step_fn, schedule, "eps", x, 0.83, 0.31, std=POINT_MASS)
    torch.testing.assert_close(out, exact_flow(x, 0.83, 0.31, schedule, POINT_MASS), rtol=0, atol=1e-12)
    out2 = integrate(step_fn, schedule, "v", x, 0.9, 0.05, 5, std=POINT_MASS)  # second-order steps too
    torch.testing.assert_close(out2, exact_flow(x, 0.9, 0.05, schedule, POINT_MASS), rtol=0, atol=1e-11)


def test_euler_is_exact_for_a_point_mass_on_rectified_flow_but_not_on_edm():
    """Rectified-flow paths to a point are straight, so Euler in t is exact; EDM's sigma(t) is curved,
    so Euler in the schedule's own t is not (DDIM, Euler in sigma, is: test above)."""
    for sch in (RectifiedFlow(), RectifiedFlow(shift=3.0)):
        out = step_with(euler_step, sch, "flow", X_START, 0.83, 0.31, std=POINT_MASS)
        torch.testing.assert_close(out, exact_flow(X_START, 0.83, 0.31, sch, POINT_MASS), rtol=0, atol=1e-12)
    sch = EDM()
    out = step_with(euler_step, sch, "edm", X_START * 5, 0.83, 0.31, std=POINT_MASS)
    assert (out - exact_flow(X_START * 5, 0.83, 0.31, sch, POINT_MASS)).abs().max() > 1.0


@pytest.mark.parametrize("schedule, step_fn, order", [
    (VPCosineContinuous(), ddim_step, 1),
    (EDM(), ddim_step, 1),
    (RectifiedFlow(), ddim_step, 1),
    (RectifiedFlow(), euler_step, 1),
    (VPLinearContinuous(), euler_step, 1),
    (VPCosineContinuous(), dpmpp_2m_step, 2),
    (EDM(), dpmpp_2m_step, 2),
    (RectifiedFlow(), dpmpp_2m_step, 2),
], ids=["ddim-VPCosineC", "ddim-EDM", "ddim-RF", "euler-RF", "euler-VPLinearC", "dpmpp-VPCosineC", "dpmpp-EDM", "dpmpp-RF"])
def test_gaussian_steps_converge_to_the_exact_ode_at_their_order(schedule, step_fn, order):
    """s > 0: not exact in one step, but the error from t = 0.8 to 0.2 shrinks like k^-order."""
    x = X_START * 10 if isinstance(schedule, EDM) else X_START
    exact = exact_flow(x, 0.8, 0.2, schedule)
    errs = [(integrate(step_fn, schedule, "x0", x, 0.8, 0.2, k) - exact).abs().max().item() for k in (8, 32)]
    assert errs[0] > 1e-6, "a Gaussian with s > 0 should not be integrated exactly"
    ratio = errs[0] / errs[1]
    assert ratio > (3.2 if order == 1 else 11.0), (errs, ratio)  # 4x steps: 4x (first) or 16x (second order)
    assert errs[1] < (0.03 if order == 1 else 1e-3) * x.abs().max().item()


def test_ddim_is_far_more_accurate_than_euler_in_t_on_edm():
    sch = EDM()
    ideal_mean, ideal_std = ideal_moments(sch)
    A_ddim, _ = affine_map(sch, "edm", "ddim", 100)
    A_euler, _ = affine_map(sch, "edm", "euler", 100)
    err_ddim = (A_ddim / ideal_std - 1).abs().max().item()
    err_euler = (A_euler / ideal_std - 1).abs().max().item()
    assert err_ddim < 0.035 and err_euler > 5 * err_ddim, (err_ddim, err_euler)


# ---------------------------------------------------------------- parameterisation independence

PARAM_CASES = [
    (VPLinear(), KINDS),
    (VPCosine(), KINDS),
    (VPCosineContinuous(), KINDS),
    (EDM(), KINDS),
    (RectifiedFlow(shift=3.0), ("x0", "v", "flow")),  # eps and edm are undefined at alpha(t_max) = 0
    (RectifiedFlow(t_max=0.999), KINDS),
]


@pytest.mark.parametrize("schedule, kinds", PARAM_CASES, ids=["VPLinear", "VPCosine", "VPCosineC", "EDM", "RF-shift3", "RF-tmax"])
@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 1.0), ("euler", 0.0), ("dpmpp_2m", 0.0)],
                         ids=["ddim", "ddim-eta1", "euler", "dpmpp_2m"])
def test_every_sampler_gives_the_same_samples_in_every_parameterization(schedule, kinds, sampler, eta):
    z = noise(64, seed=11)
    ref = run(schedule, "x0", sampler, 12, z, eta=eta, seed=5)
    assert torch.isfinite(ref).all()
    for kind in kinds:
        out = run(schedule, kind, sampler, 12, z, eta=eta, seed=5)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-8, msg=lambda m: f"{kind}: {m}")


@pytest.mark.parametrize("schedule", [RectifiedFlow(), RectifiedFlow(shift=3.0)], ids=["RF", "RF-shift3"])
@pytest.mark.parametrize("kind", ["x0", "v", "flow"])
def test_ddim_eta0_equals_euler_on_rectified_flow(schedule, kind):
    """x' = (1 - t') D + t' eps  ==  x + (t' - t)(eps - D) when x = (1 - t) D + t eps."""
    z = noise(256, seed=12)
    torch.testing.assert_close(run(schedule, kind, "ddim", 17, z), run(schedule, kind, "euler", 17, z), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- the sample() loop itself

def test_one_step_sampling_starts_at_sigma_max_and_ends_at_the_denoised_sample():
    z = noise(5, seed=13)
    # EDM: x_T = sqrt(80^2 + 1) z (diffusers' init_noise_sigma), one step to clean returns E[x0 | x_T]
    x = run(EDM(), "edm", "ddim", 1, z)
    k = math.sqrt(80.0**2 + 1)
    torch.testing.assert_close(x, MU + STD**2 / (STD**2 + 80.0**2) * (k * z - MU), rtol=0, atol=1e-12)
    # rectified flow: alpha(1) = 0, so E[x0 | x_1] = mu whatever the noise
    for sampler in SAMPLERS:
        torch.testing.assert_close(run(RectifiedFlow(), "flow", sampler, 1, z), MU.expand(5, 2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_one_network_call_per_step(sampler):
    g, net = guided_for(VPCosine(), "eps")
    sample(g, noise(4), None, 1.0, 9, sampler)
    assert net.calls == 9 and g.nfe == 9


def test_ancestral_noise_follows_the_generator():
    z = noise(32, seed=14)
    sch = VPLinear()
    a = run(sch, "eps", "ddim", 6, z, eta=1.0, seed=1)
    b = run(sch, "eps", "ddim", 6, z, eta=1.0, seed=1)
    c = run(sch, "eps", "ddim", 6, z, eta=1.0, seed=2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    d0 = run(sch, "eps", "ddim", 6, z, eta=0.0, seed=1)
    torch.testing.assert_close(d0, run(sch, "eps", "ddim", 6, z, eta=0.0, seed=2), rtol=0, atol=0)
    assert (a - d0).abs().max() > 1e-3  # eta changes the result


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sampling_keeps_the_noise_dtype_and_shape(sampler, dtype):
    g, _ = guided_for(RectifiedFlow(), "flow")
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = sample(g, z, None, 1.0, 4, sampler)
    assert out.shape == z.shape and out.dtype == dtype
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- validation

def test_unknown_sampler_lists_the_available_ones():
    g, _ = guided_for(VPLinear())
    with pytest.raises(ValueError, match=r"unknown sampler 'heun'; available: ddim, euler, dpmpp_2m"):
        sample(g, noise(2), None, 1.0, 4, "heun")
    assert set(SAMPLERS) == {"ddim", "euler", "dpmpp_2m"}


@pytest.mark.parametrize("steps", [0, -2, 2.5, "4"])
def test_bad_step_counts_are_rejected(steps):
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        check_sampler("ddim", steps)
