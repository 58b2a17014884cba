"""Stateful guiders and network-evaluation counts: adaptive guidance drops the unconditional branch,
APG's momentum, CFG-Zero*'s step counter, CFG++ re-noising, the guidance interval's NFE hook."""
from __future__ import annotations


import torch

from guidance.guided import GuidedDenoiser
from guidance.guiders import build_guider
from guidance.guiders.base import GuideContext
from guidance.parameterization import Prediction
from guidance.samplers import ddim_step, euler_step, sample
from guidance.schedules import EDM, RectifiedFlow, _bcast
from tests.guidance.gmm import GaussianMixture, gmm_denoiser

DT = torch.float64


def setup(schedule=None, param="flow", b=2, seed=0):
    schedule = RectifiedFlow() if schedule is None else schedule
    gmm = GaussianMixture.random(seed=seed, spread=0.5)
    den = gmm_denoiser(gmm, schedule, param)
    noise = torch.randn(b, *gmm.shape, generator=torch.Generator().manual_seed(seed), dtype=DT)
    labels = torch.arange(b) % gmm.num_classes
    return gmm, den, noise, labels


def trajectory_times(schedule, steps):
    return schedule.sampling_times(steps).to(DT)


def cosines_along_cfg_trajectory(den, noise, labels, w, steps):
    """cos(eps_c, eps_u) per step and sample along the CFG trajectory (DDIM), [steps, B]."""
    guided = GuidedDenoiser(den, build_guider("cfg"))
    times = trajectory_times(den.schedule, steps)
    x = noise * den.schedule.alpha_sigma(times[:1])[1]
    out = []
    for i in range(steps):
        t = times[i].expand(x.shape[0])
        preds = guided.run_branches(guided.guider.branches(), x, t, labels)
        e_c, e_u = preds["cond"].eps.flatten(1), preds["uncond"].eps.flatten(1)
        out.append((e_c * e_u).sum(1) / (e_c.norm(dim=1) * e_u.norm(dim=1)))
        pred, _ = guided.guide(x, t, labels, w)
        t_next = times[i + 1].expand(x.shape[0]) if i + 1 < steps else torch.full_like(t, -1.0)
        x = ddim_step(pred, x, t_next, den.schedule)
    return torch.stack(out)


def test_adaptive_guidance_drops_uncond_branch_once_cosine_passes_gamma():
    gmm, den, noise, labels = setup(b=1)
    steps, w = 12, 3.0
    cos = cosines_along_cfg_trajectory(den, noise, labels, w, steps)[:, 0]
    # rectified flow: eps_c = eps_u = x_t at t = 1 (cos 1), skipped by min_steps=1; then the cosine dips and rises
    gamma = 0.9995
    first = 1 + int(torch.nonzero(cos[1:] > gamma)[0])  # the last CFG step; conditional-only afterwards
    assert cos[0] > gamma and 2 < first < steps - 2
    guided = GuidedDenoiser(den, build_guider("adaptive", gamma=gamma, min_steps=1))
    x_ad = sample(guided, noise, labels, w=w, steps=steps)
    assert guided.nfe == 2 * (first + 1) + (steps - first - 1) < 2 * steps
    # same trajectory as CFG for the first steps, then conditional: reproduce it by hand
    cfg, cond = GuidedDenoiser(den, build_guider("cfg")), GuidedDenoiser(den, build_guider("conditional"))
    times = trajectory_times(den.schedule, steps)
    x = noise * den.schedule.alpha_sigma(times[:1])[1]
    for i in range(steps):
        t = times[i].expand(1)
        pred = (cfg if i <= first else cond)(x, t, labels, w)
        t_next = times[i + 1].expand(1) if i + 1 < steps else torch.full_like(t, -1.0)
        x = ddim_step(pred, x, t_next, den.schedule)
    assert torch.allclose(x_ad, x, atol=1e-10)


def _pred(x0, x_t, a, s):
    return Prediction.from_x0(x0, x_t, a, s)


def test_adaptive_guidance_latches_per_sample_and_saves_only_when_all_latched():
    g = build_guider("adaptive", gamma=0.9, min_steps=0)
    x_t = torch.ones(2, 1, 1, 2, dtype=DT)
    a, s = torch.full((2, 1, 1, 1), 0.6, dtype=DT), torch.full((2, 1, 1, 1), 0.8, dtype=DT)
    ctx = lambda state: GuideContext(x_t=x_t, t=torch.full((2,), 0.5, dtype=DT), alpha=a, sigma=s,  # noqa: E731
                                     w=torch.tensor([3.0, 3.0]), state=state)
    # eps = (x_t - a x0) / s; sample 0: eps_c = eps_u direction (cos 1), sample 1: orthogonal (cos 0)
    eps_c = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=DT).reshape(2, 1, 1, 2)
    eps_u = torch.tensor([[2.0, 2.0], [0.0, 1.0]], dtype=DT).reshape(2, 1, 1, 2)
    x0 = lambda e: (x_t - s * e) / a  # noqa: E731
    preds = {"cond": _pred(x0(eps_c), x_t, a, s), "uncond": _pred(x0(eps_u), x_t, a, s)}
    state = g.init_state(2)
    assert len(g.branches(state)) == 2
    out, state1 = g.combine(preds, ctx(state))
    cfg = x0(eps_u) + 3 * (x0(eps_c) - x0(eps_u))
    assert torch.allclose(out.x0, cfg)  # the latching call is still CFG
    assert state1["off"].tolist() == [True, False] and state["off"].tolist() == [False, False]
    assert len(g.branches(state1)) == 2  # sample 1 still needs the unconditional pass
    out, state2 = g.combine(preds, ctx(state1))
    assert torch.allclose(out.x0[0], x0(eps_c)[0]) and torch.allclose(out.x0[1], cfg[1])
    preds["uncond"] = _pred(x0(eps_c), x_t, a, s)  # now aligned for sample 1 too
    _, state3 = g.combine(preds, ctx(state2))
    assert [b.name for b in g.branches(state3)] == ["cond"]
    out, state4 = g.combine({"cond": preds["cond"]}, ctx(state3))
    assert out is preds["cond"] and state4["off"].all() and state4["step"] == 4


def test_apg_momentum_state_evolves_as_running_average():
    gmm, den, noise, labels = setup(b=2)
    beta, r = -0.5, 1.0
    g = build_guider("apg", beta=beta, r=r, eta=0.0)
    guided = GuidedDenoiser(den, g)
    state = g.init_state(2)
    assert torch.equal(state["avg"], torch.zeros(2))
    avg = torch.zeros(1, dtype=DT)
    w = torch.tensor([2.0, 4.0])
    for k, t in enumerate([0.9, 0.7, 0.5]):
        x_t = noise * (1 + k) / 3
        tt = torch.full((2,), t, dtype=DT)
        old = state
        pred, state = guided.guide(x_t, tt, labels, w, state=state)
        a, s = den.schedule.alpha_sigma(_bcast(tt, x_t))
        d_c = gmm.posterior_mean(x_t, a.flatten(), s.flatten(), labels)
        d_u = gmm.posterior_mean(x_t, a.flatten(), s.flatten(), torch.full_like(labels, -1))
        avg = (d_c - d_u) + beta * avg  # Delta_t + beta * Delta_{t-1}
        assert torch.allclose(state["avg"], avg, atol=1e-12)
        assert state is not old  # a new state; the caller's old one is untouched
        clipped = avg * torch.clamp(r / avg.flatten(1).norm(dim=1), max=1).reshape(-1, 1, 1, 1)
        par = (clipped * d_c).flatten(1).sum(1).reshape(-1, 1, 1, 1) / (d_c * d_c).flatten(1).sum(1).reshape(-1, 1, 1, 1) * d_c
        assert torch.allclose(pred.x0, d_c + (w.to(DT).reshape(-1, 1, 1, 1) - 1) * (clipped - par), atol=1e-10)


def test_cfg_zero_star_zero_init_counts_steps_and_skips_network():
    gmm, den, noise, labels = setup(b=2)
    steps, k = 6, 2
    g = build_guider("cfg_zero_star", zero_init_steps=k)
    guided = GuidedDenoiser(den, g)
    state = g.init_state(2)
    times = trajectory_times(den.schedule, steps)
    x = noise * den.schedule.alpha_sigma(times[:1])[1]
    for i in range(steps):
        pred, state = guided.guide(x, times[i].expand(2), labels, 3.0, state=state)
        assert state["step"] == i + 1
        if i < k:
            assert torch.equal(pred.read("flow"), torch.zeros_like(x))
        else:
            assert pred.read("flow").abs().max() > 0
    assert guided.nfe == 2 * (steps - k)
    guided.reset_nfe()
    sample(guided, noise, labels, w=3.0, steps=steps, sampler="euler")
    assert guided.nfe == 2 * (steps - k)


def test_cfg_pp_ddim_and_euler_renoise_with_uncond_eps():
    gmm, den, noise, labels = setup(b=2)
    lam = 0.5
    guided = GuidedDenoiser(den, build_guider("cfg_pp", lam=lam))
    t, t_next = torch.full((2,), 0.8, dtype=DT), torch.full((2,), 0.6, dtype=DT)
    x = noise * 0.8
    pred = guided(x, t, labels, 1.0)
    a, s = den.schedule.alpha_sigma(_bcast(t, x))
    d_c = gmm.posterior_mean(x, a.flatten(), s.flatten(), labels)
    d_u = gmm.posterior_mean(x, a.flatten(), s.flatten(), torch.full_like(labels, -1))
    d = d_u + lam * (d_c - d_u)
    eps_u = (x - a * d_u) / s
    a_n, s_n = den.schedule.alpha_sigma(_bcast(t_next, x))
    x_next = ddim_step(pred, x, t_next, den.schedule)
    assert torch.allclose(x_next, a_n * d + s_n * eps_u, atol=1e-12)
    assert not torch.allclose(x_next, a_n * d + s_n * (x - a * d) / s, atol=1e-3)  # not CFG's own eps
    x_eul = euler_step(pred, x, t_next, den.schedule, state={"t": t})
    assert torch.allclose(x_eul, x + (t_next - t).reshape(-1, 1, 1, 1) * (eps_u - d), atol=1e-12)  # RF: v = eps_u - D


def test_interval_saves_evaluations_outside_with_the_branches_at_hook():
    schedule = EDM()
    gmm, den, noise, labels = setup(schedule, "edm", b=2)
    steps = 10
    sig = schedule.sigma(trajectory_times(schedule, steps))
    lo, hi = 0.3, 5.0
    inside = int(((sig > lo) & (sig <= hi)).sum())
    assert 0 < inside < steps
    spec = dict(sigma_lo=lo, sigma_hi=hi, inner={"name": "apg", "eta": 0.0})
    gated = GuidedDenoiser(den, build_guider("interval", **spec))
    x_gated = sample(gated, noise, labels, w=2.0, steps=steps)
    assert gated.nfe == steps + inside  # conditional only (1 evaluation) outside the interval
    # the same samples as a guider that always pays for both branches and selects per sample
    always = GuidedDenoiser(den, build_guider("interval", **spec), batch_branches=False)
    always.guider.branches_at = lambda state, t, a, s: always.guider.branches(state)
    x_always = sample(always, noise, labels, w=2.0, steps=steps)
    assert always.nfe == 2 * steps
    assert torch.allclose(x_gated, x_always, atol=1e-10)


def test_stateful_guiders_work_without_state_for_teacher_targets():
    gmm, den, noise, labels = setup(b=2)
    t = torch.full((2,), 0.7, dtype=DT)
    for name in ("adaptive", "apg", "cfg_zero_star"):
        pred, state = GuidedDenoiser(den, build_guider(name)).guide(noise, t, labels, 2.0, state=None)
        assert state is None and torch.isfinite(pred.x0).all()


def test_wrappers_around_cfg_zero_star_during_zero_init():
    """CFG-Zero* asks for no branch in its zero-init steps; rescale and interval add the conditional
    branch they need and stay finite."""
    gmm, den, noise, labels = setup(b=2)
    t = torch.full((2,), 1.0, dtype=DT)
    for name, params in [("rescale", {"space": "flow"}), ("interval", {"t_lo": 0.5, "t_hi": 1.0})]:
        g = build_guider(name, inner={"name": "cfg_zero_star", "zero_init_steps": 1}, **params)
        assert [b.name for b in g.branches(g.init_state(2))] == ["cond"]
        guided = GuidedDenoiser(den, g)
        pred, state = guided.guide(noise, t, labels, 3.0, state=g.init_state(2))
        assert guided.nfe == 1 and state["step"] == 1
        assert torch.equal(pred.read("flow"), torch.zeros_like(noise))
        pred, state = guided.guide(noise * 0.9, t * 0.9, labels, 3.0, state=state)
        assert guided.nfe == 3 and torch.isfinite(pred.x0).all()
