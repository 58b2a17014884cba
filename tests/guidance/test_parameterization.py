"""Parameterisations: float64 round trips between eps/x0/v/flow/edm, the METHODS.md notation table,
Prediction reads, and the Denoiser's input scaling and dtype handling."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from guidance import parameterization as P
from guidance.denoiser import Denoiser
from guidance.parameterization import (
    PARAMETERIZATIONS,
    Prediction,
    check_parameterization,
    from_x0,
    input_scale,
    to_x0,
    x0_coefficients,
)
from guidance.schedules import EDM, RectifiedFlow, VPCosine, VPCosineContinuous, VPLinear, VPLinearContinuous

KINDS = ("eps", "x0", "v", "flow", "edm")
SPACES = ("eps", "x0", "v", "flow")  # what Prediction.from_space accepts (guiders' spaces)


def schedules():
    return {
        "vp_linear": VPLinear(),
        "vp_scaled_linear": VPLinear(scaled=True, beta_start=0.00085, beta_end=0.012),
        "vp_cosine": VPCosine(),
        "vp_linear_continuous": VPLinearContinuous(),
        "vp_cosine_continuous": VPCosineContinuous(),
        "rectified_flow": RectifiedFlow(),
        "rectified_flow_shift3": RectifiedFlow(shift=3.0),
        "edm": EDM(),
    }


SCHEDULE_NAMES = list(schedules())


def setup(schedule, n_t=41, seed=0, sigma_data=0.5):
    """x0, eps [n_t, 2, 3, 3] float64, x_t at n_t interior times; alpha, sigma [n_t, 1, 1, 1]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(schedule.t_min, schedule.t_max, n_t + 2, dtype=torch.float64)[1:-1]
    a, s = schedule.alpha_sigma(t)
    a, s = a.reshape(-1, 1, 1, 1), s.reshape(-1, 1, 1, 1)
    x0 = torch.randn(n_t, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(n_t, 2, 3, 3, generator=g, dtype=torch.float64)
    return x0, eps, a * x0 + s * eps, a, s


def hand_raw(kind, x0, eps, x_t, a, s, sigma_data=0.5):
    """The raw output of a perfect network of each kind, from METHODS.md / the papers, written out."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":  # Salimans & Ho 2022: v = alpha eps - sigma x0
        return a * eps - s * x0
    if kind == "flow":  # rectified-flow velocity u = eps - x0
        return eps - x0
    se = s / a  # EDM on x = x_t / alpha (Karras et al. 2022, Eq. 7 and Table 1): D = c_skip x + c_out F
    c_skip = sigma_data**2 / (se**2 + sigma_data**2)
    c_out = se * sigma_data / (se**2 + sigma_data**2) ** 0.5
    return (x0 - c_skip * x_t / a) / c_out


def close(actual, expected, tol=1e-12):
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol * scale)


# ---------------------------------------------------------------- round trips, every schedule and kind

@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_to_x0_of_hand_raw_output_recovers_x0(name, kind):
    x0, eps, x_t, a, s = setup(schedules()[name])
    y = hand_raw(kind, x0, eps, x_t, a, s)
    close(to_x0(y, x_t, a, s, kind), x0, 1e-11)
    close(from_x0(x0, x_t, a, s, kind), y, 1e-11)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_from_x0_to_x0_round_trip_is_exact_in_float64(name, kind):
    x0, eps, x_t, a, s = setup(schedules()[name], seed=1)
    y = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    close(from_x0(to_x0(y, x_t, a, s, kind), x_t, a, s, kind), y, 1e-10)
    close(to_x0(from_x0(x0, x_t, a, s, kind), x_t, a, s, kind), x0, 1e-10)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("kind, space", list(itertools.product(KINDS, KINDS)))
def test_prediction_read_in_every_space(name, kind, space):
    """A Prediction built from a perfect network's raw output in `kind` reads back the exact target
    of every other parameterisation, and stores x0 and eps."""
    x0, eps, x_t, a, s = setup(schedules()[name], n_t=9, seed=2)
    pred = Prediction.from_raw(hand_raw(kind, x0, eps, x_t, a, s), kind, x_t, a, s)
    close(pred.read(space), hand_raw(space, x0, eps, x_t, a, s), 1e-10)
    close(pred.x0, x0, 1e-10)
    close(pred.eps, eps, 1e-10)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_read_of_raw_output_returns_the_raw_output(name, kind):
    """read(kind) of a Prediction built from raw y of that kind equals y (arbitrary y, not a perfect network)."""
    _, _, x_t, a, s = setup(schedules()[name], seed=3)
    y = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    close(Prediction.from_raw(y, kind, x_t, a, s).read(kind), y, 1e-12 if kind != "edm" else 1e-11)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("space", SPACES)
def test_from_space_builds_the_same_prediction(name, space):
    x0, eps, x_t, a, s = setup(schedules()[name], n_t=9, seed=4)
    like = Prediction.from_x0(x0 * 0.5, x_t, a, s)  # different x0: from_space must use only (x_t, alpha, sigma)
    pred = Prediction.from_space(hand_raw(space, x0, eps, x_t, a, s), space, like)
    close(pred.x0, x0, 1e-10)
    close(pred.eps, eps, 1e-10)
    assert pred.x_t is like.x_t and pred.alpha is like.alpha and pred.sigma is like.sigma


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_raw_target_matches_hand_formulas(name, kind):
    if not hasattr(P, "raw_target"):
        pytest.skip("guidance.parameterization.raw_target not present in this version")
    x0, eps, x_t, a, s = setup(schedules()[name], seed=5)
    close(P.raw_target(kind, x0, eps, a, s), hand_raw(kind, x0, eps, x_t, a, s), 1e-10)


# ---------------------------------------------------------------- the notation table of METHODS.md

@pytest.mark.parametrize("name", ["vp_linear", "vp_cosine", "vp_linear_continuous", "vp_cosine_continuous"])
def test_v_table_rows_for_vp(name):
    """v = alpha eps - sigma x0;  D = alpha x_t - sigma v;  eps = sigma x_t + alpha v  (alpha^2 + sigma^2 = 1)."""
    x0, eps, x_t, a, s = setup(schedules()[name], seed=6)
    v = from_x0(x0, x_t, a, s, "v")
    close(v, a * eps - s * x0, 1e-12)
    pred = Prediction.from_raw(v, "v", x_t, a, s)
    close(pred.x0, a * x_t - s * v, 1e-12)
    close(pred.eps, s * x_t + a * v, 1e-10)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_table_rows_for_rectified_flow(shift):
    """u = eps - x0;  D = x_t - t u;  eps = x_t + (1 - t) u  (alpha = 1 - t, sigma = t)."""
    sch = RectifiedFlow(shift=shift)
    x0, eps, x_t, a, s = setup(sch, seed=7)
    t = s
    u = from_x0(x0, x_t, a, s, "flow")
    close(u, eps - x0, 1e-12)
    pred = Prediction.from_raw(u, "flow", x_t, a, s)
    close(pred.x0, x_t - t * u, 1e-12)
    close(pred.eps, x_t + (1 - t) * u, 1e-12)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_preconditioning_coefficients(sigma_data):
    """Karras et al. 2022, Table 1 with alpha = 1: c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2),
    c_in = 1/sqrt(s^2+sd^2); D = c_skip x + c_out F; eps = (x_t - D)/sigma."""
    sch = EDM()
    x0, eps, x_t, a, s = setup(sch, seed=8)
    assert (a == 1).all()
    A, B = x0_coefficients("edm", a, s, sigma_data)
    close(A, s * sigma_data / (s**2 + sigma_data**2).sqrt(), 1e-14)
    close(B, sigma_data**2 / (s**2 + sigma_data**2), 1e-14)
    close(input_scale("edm", a, s, sigma_data), 1 / (s**2 + sigma_data**2).sqrt(), 1e-14)
    F = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pred = Prediction.from_raw(F, "edm", x_t, a, s, sigma_data)
    close(pred.x0, B * x_t + A * F, 1e-12)
    close(pred.eps, (x_t - pred.x0) / s, 1e-12)
    close(pred.read("edm", sigma_data), F, 1e-11)
    # a perfect EDM network, with the non-default sigma_data
    close(to_x0(hand_raw("edm", x0, eps, x_t, a, s, sigma_data), x_t, a, s, "edm", sigma_data), x0, 1e-11)


def test_edm_on_a_vp_schedule_works_on_x_t_over_alpha():
    """EDM preconditioning on a VP schedule: c_in applies to x = x_t / alpha with sigma_e = sigma / alpha."""
    x0, eps, x_t, a, s = setup(VPCosine(), seed=9)
    se = s / a
    close(input_scale("edm", a, s), 1 / (a * (se**2 + 0.25).sqrt()), 1e-12)
    close(input_scale("eps", a, s), torch.ones_like(s), 0)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_affine_rules_give_the_same_x0_in_every_space(name):
    """Conversions are affine with the same offset for every branch, so CFG (branch weights sum to 1)
    combined in any space maps to the same x0 (METHODS.md, Notation)."""
    _, _, x_t, a, s = setup(schedules()[name], n_t=9, seed=10)
    g = torch.Generator().manual_seed(11)
    x0_c, x0_u = (torch.randn(x_t.shape, generator=g, dtype=torch.float64) for _ in range(2))
    w = 4.5
    expected = x0_u + w * (x0_c - x0_u)
    for kind in KINDS:
        y_c, y_u = from_x0(x0_c, x_t, a, s, kind), from_x0(x0_u, x_t, a, s, kind)
        close(to_x0(y_u + w * (y_c - y_u), x_t, a, s, kind), expected, 1e-10)


def test_prediction_eps_is_derived_and_with_eps_overrides_only_eps():
    x0, eps, x_t, a, s = setup(VPLinear(), n_t=3, seed=12)
    pred = Prediction.from_x0(x0, x_t, a, s)
    close(pred.eps, (x_t - a * x0) / s, 1e-14)
    other = torch.zeros_like(eps)
    p2 = pred.with_eps(other)
    assert p2.eps is other and p2.x0 is pred.x0 and p2.x_t is pred.x_t
    assert pred.eps is not other  # the original is unchanged


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("call", [
    lambda: check_parameterization("velocity"),
    lambda: x0_coefficients("velocity", torch.ones(1), torch.ones(1)),
    lambda: to_x0(torch.ones(1), torch.ones(1), torch.ones(1), torch.ones(1), "velocity"),
    lambda: from_x0(torch.ones(1), torch.ones(1), torch.ones(1), torch.ones(1), "velocity"),
    lambda: Prediction.from_x0(torch.ones(1), torch.ones(1), torch.ones(1), torch.ones(1)).read("velocity"),
    lambda: Denoiser(nn.Identity(), VPLinear(), "velocity"),
], ids=["check", "x0_coefficients", "to_x0", "from_x0", "read", "Denoiser"])
def test_unknown_parameterization_raises_listing_choices(call):
    with pytest.raises(ValueError, match=r"unknown parameterization 'velocity'; choose one of eps, x0, v, flow, edm"):
        call()


def test_parameterization_registry():
    assert tuple(PARAMETERIZATIONS) == KINDS
    for k in KINDS:
        assert check_parameterization(k) == k


# ---------------------------------------------------------------- the Denoiser wrapper

class RecordingNet(nn.Module):
    """Returns a fixed function of its input and records what it was given."""

    def __init__(self, out_dtype=None):
        super().__init__()
        self.seen = []
        self.out_dtype = out_dtype

    def forward(self, x, net_time, cond, **kw):
        self.seen.append((x.clone(), net_time.clone(), cond, kw))
        y = 0.5 * x + 0.1 * net_time.reshape(-1, *([1] * (x.ndim - 1))) / 1000
        return y.to(self.out_dtype) if self.out_dtype is not None else y


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["vp_linear", "rectified_flow", "edm"])
def test_denoiser_scales_input_feeds_net_time_and_converts_output(kind, name):
    sch = schedules()[name]
    net = RecordingNet()
    den = Denoiser(net, sch, kind)
    _, _, x_t, a, s = setup(sch, n_t=5, seed=13)
    t = torch.linspace(sch.t_min, sch.t_max, 7, dtype=torch.float64)[1:-1]
    pred = den(x_t, t, "c", extra=3)
    x_in, net_time, cond, kw = net.seen[0]
    close(x_in, input_scale(kind, a, s) * x_t, 1e-14)
    close(net_time, sch.net_time(t), 1e-14)
    assert cond == "c" and kw == {"extra": 3}
    y = 0.5 * x_in + 0.1 * net_time.reshape(-1, 1, 1, 1) / 1000
    close(pred.x0, to_x0(y, x_t, a, s, kind), 1e-12)
    close(pred.eps, (x_t - a * pred.x0) / s, 1e-10)
    close(pred.alpha, a, 0), close(pred.sigma, s, 0)
    if kind == "edm" and name == "edm":
        close(x_in, x_t / (s**2 + 0.25).sqrt(), 1e-14)  # c_in


def test_denoiser_converts_low_precision_outputs_in_float32():
    sch = VPLinear()
    den = Denoiser(RecordingNet(out_dtype=torch.bfloat16), sch, "eps")
    x_t = torch.randn(2, 3, 4, 4)
    pred = den(x_t.to(torch.bfloat16), torch.tensor([0.2, 0.7]), None)
    assert pred.x0.dtype == pred.eps.dtype == pred.x_t.dtype == torch.float32
    pred64 = Denoiser(RecordingNet(), sch, "v")(x_t.double(), torch.tensor([0.2, 0.7], dtype=torch.float64), None)
    assert pred64.x0.dtype == torch.float64


def test_denoiser_null_cond_delegates_to_net():
    class Net(RecordingNet):
        def null_cond(self, cond):
            return torch.full_like(cond, 10)

    den = Denoiser(Net(), VPLinear())
    assert torch.equal(den.null_cond(torch.tensor([1, 2])), torch.tensor([10, 10]))
