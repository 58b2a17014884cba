"""Every guider against the analytic combination of closed-form (Gaussian-mixture) branch predictions,
plus the registry, nested configs and parameter validation."""
from __future__ import annotations

import pytest
import torch

from guidance.guided import GuidedDenoiser
from guidance.guiders import GUIDERS, build_guider, list_guiders
from guidance.guiders.base import GuideContext
from guidance.parameterization import Prediction
from guidance.samplers import ddim_step
from guidance.schedules import EDM, RectifiedFlow, VPCosine, VPLinear
from tests.guidance.gmm import GaussianMixture, gmm_denoiser

DT = torch.float64
W = torch.tensor([0.0, 1.0, 2.5, 4.0], dtype=DT)  # per-sample scales, exact in float32
LABELS = torch.tensor([0, 1, 2, 0])
T = torch.tensor([0.5, 0.6, 0.75, 0.9], dtype=DT)


def col(v, like):
    return v.reshape(-1, *([1] * (like.ndim - 1)))


class Setup:
    """A mixture, its exact denoiser under `schedule`/`param`, and a batch of x_t drawn from the data."""

    def __init__(self, schedule=None, param="flow", seed=0, t=T):
        self.schedule = RectifiedFlow() if schedule is None else schedule
        self.t = t
        self.gmm = GaussianMixture.random(seed=seed, spread=0.5)  # overlapping classes: D_c != D_u
        self.den = gmm_denoiser(self.gmm, self.schedule, param)
        g = torch.Generator().manual_seed(seed + 1)
        a, s = self.schedule.alpha_sigma(t)
        self.alpha, self.sigma = a, s
        x0 = self.gmm.sample(LABELS, generator=g)
        self.x_t = col(a, x0) * x0 + col(s, x0) * torch.randn(x0.shape, generator=g, dtype=DT)

    def D(self, labels, gmm=None):
        """Closed-form E[x0 | x_t, labels] (labels -1: unconditional)."""
        return (gmm or self.gmm).posterior_mean(self.x_t, self.alpha, self.sigma, labels)

    def eps(self, d):
        return (self.x_t - col(self.alpha, d) * d) / col(self.sigma, d)

    def guided(self, guider, **kw):
        return GuidedDenoiser(self.den, guider, **kw)

    def close(self, a, b, tol=1e-10):
        assert torch.allclose(a, b, atol=tol, rtol=0), (a - b).abs().max().item()


NULL = torch.full_like(LABELS, -1)


@pytest.mark.parametrize("schedule,param", [(RectifiedFlow(), "flow"), (VPLinear(), "eps"), (VPCosine(), "v"),
                                            (EDM(), "edm"), (RectifiedFlow(), "x0")])
def test_cfg_is_analytic_combination_and_endpoints(schedule, param):
    s = Setup(schedule, param)
    d_c, d_u = s.D(LABELS), s.D(NULL)
    out = s.guided(build_guider("cfg"))(s.x_t, T, LABELS, W)
    s.close(out.x0, d_u + col(W, d_c) * (d_c - d_u), 1e-9)
    s.close(out.x0[1], d_c[1], 1e-9)  # w = 1: conditional
    s.close(out.x0[0], d_u[0], 1e-9)  # w = 0: unconditional
    orig = s.guided(build_guider("cfg", convention="original"))(s.x_t, T, LABELS, W)
    s.close(orig.x0, d_c + col(W, d_c) * (d_c - d_u), 1e-9)


def test_cfg_negative_condition_replaces_null():
    s = Setup()
    neg = torch.tensor([1, 2, 0, 1])
    out = s.guided(build_guider("cfg"))(s.x_t, T, LABELS, W, neg_cond=neg)
    d_c, d_n = s.D(LABELS), s.D(neg)
    s.close(out.x0, d_n + col(W, d_c) * (d_c - d_n))


def test_perp_neg_matches_formula_in_one_batched_forward():
    t = torch.tensor([0.6, 0.7, 0.8, 0.9], dtype=DT)  # noisy enough that D_c != D_u in every sample
    s = Setup(VPCosine(), "eps", t=t)
    negs = [torch.tensor([1, 2, 0, 1]), torch.tensor([2, 0, 1, 2])]
    weights = [1.0, 0.5]
    s.den.net.calls.clear()
    out = s.guided(build_guider("perp_neg", neg_weights=weights))(s.x_t, t, LABELS, W, neg_cond=negs)
    assert s.den.net.calls == [(4 * len(LABELS), None)]  # cond, null, neg:0, neg:1 batched
    e_c, e_0 = s.eps(s.D(LABELS)), s.eps(s.D(NULL))
    pos = e_c - e_0
    step = pos.clone()
    for w_i, n in zip(weights, negs):
        e_i = s.eps(s.D(n)) - e_0
        for b in range(len(LABELS)):
            step[b] -= w_i * (e_i[b] - (e_i[b] * pos[b]).sum() / (pos[b] * pos[b]).sum() * pos[b])
    expected = e_0 + col(W, e_0) * step
    s.close(Prediction.from_x0(out.x0, s.x_t, col(s.alpha, out.x0), col(s.sigma, out.x0)).eps, expected, 1e-8)


def test_perp_neg_negative_equal_to_positive_has_no_effect():
    s = Setup()
    out = s.guided(build_guider("perp_neg"))(s.x_t, T, LABELS, W, neg_cond=[LABELS])
    ref = s.guided(build_guider("cfg"))(s.x_t, T, LABELS, W)  # null uncond (no neg_cond)
    s.close(out.x0, ref.x0, 1e-9)


def test_cfg_pp_interpolates_and_carries_uncond_eps():
    s = Setup()
    lam = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=DT)
    d_c, d_u = s.D(LABELS), s.D(NULL)
    out = s.guided(build_guider("cfg_pp"))(s.x_t, T, LABELS, lam)
    s.close(out.x0, d_u + col(lam, d_c) * (d_c - d_u))
    s.close(out.eps, s.eps(d_u))
    fixed = s.guided(build_guider("cfg_pp", lam=0.75))(s.x_t, T, LABELS, W)  # fixed lam ignores w
    s.close(fixed.x0, d_u + 0.75 * (d_c - d_u))


def test_autoguidance_uses_weak_model_with_same_condition():
    s = Setup()
    weak_gmm = s.gmm.widened(1.3)
    weak = gmm_denoiser(weak_gmm, s.schedule, "eps")
    out = s.guided(build_guider("autoguidance"), weak=weak)(s.x_t, T, LABELS, W)
    d_main, d_weak = s.D(LABELS), s.D(LABELS, weak_gmm)
    s.close(out.x0, d_weak + col(W, d_main) * (d_main - d_weak))
    with pytest.raises(ValueError, match="weak model"):
        s.guided(build_guider("autoguidance"))


def test_pag_adds_perturbed_term_and_runs_perturbed_pass_alone():
    s = Setup()
    s.den.net.calls.clear()
    guided = s.guided(build_guider("pag", pag_scale=2.0))
    out = guided(s.x_t, T, LABELS, W)
    d_c, d_u, d_p = s.D(LABELS), s.D(NULL), s.D(LABELS, s.den.net.perturbed)
    s.close(out.x0, d_u + col(W, d_c) * (d_c - d_u) + 2.0 * (d_c - d_p))
    assert sorted(s.den.net.calls, key=str) == sorted([(4, "pag"), (8, None)], key=str)
    assert guided.nfe == 3


@pytest.mark.parametrize("base", ["cond", "null"])
@pytest.mark.parametrize("schedule,param", [(VPLinear(), "eps"), (RectifiedFlow(), "flow"), (EDM(), "edm")])
def test_classifier_guidance_with_exact_classifier_equals_cfg(base, schedule, param):
    """Tweedie: D = (x_t + sigma^2 grad log p_t) / alpha, so D_base + s sigma^2/alpha grad log p(y|x_t)
    with s = w - 1 (cond) or s = w (null) is exactly CFG with w for the exact classifier."""
    s = Setup(schedule, param)
    g = build_guider("classifier", classifier=s.gmm.noisy_classifier(s.schedule), base=base)
    out = s.guided(g)(s.x_t, T, LABELS, W)
    d_c, d_u = s.D(LABELS), s.D(NULL)
    s.close(out.x0, d_u + col(W, d_c) * (d_c - d_u), 1e-7)
    assert not s.x_t.requires_grad


def test_gfcg_reference_class_scale_and_extra_branch():
    s = Setup()
    s.den.net.calls.clear()
    guided = s.guided(build_guider("gfcg", classifier=s.gmm.clean_classifier()))
    out = guided(s.x_t, T, LABELS, W)
    assert guided.nfe == 2 and len(s.den.net.calls) == 2
    d_c = s.D(LABELS)
    probs = torch.softmax(s.gmm.clean_classifier()(d_c), dim=1)
    for b in range(len(LABELS)):
        p = probs[b].clone()
        p_c = p[LABELS[b]].item()
        p[LABELS[b]] = -1
        c_r = int(p.argmax())
        w_r = (W[b].item() - 1) * min(1.0, p[c_r].item() / p_c)
        d_r = s.gmm.posterior_mean(s.x_t[b:b + 1], s.alpha[b:b + 1], s.sigma[b:b + 1], torch.tensor([c_r]))[0]
        s.close(out.x0[b], d_c[b] + w_r * (d_c[b] - d_r), 1e-9)


def test_flowchef_steps_x_t_along_loss_gradient_without_network_backprop():
    s = Setup()  # rectified flow
    target = torch.zeros_like(s.x_t)
    seen = []

    def loss(x0):
        seen.append((x0.is_leaf, x0.requires_grad))
        return 0.5 * ((x0 - target) ** 2).flatten(1).sum(1)

    step = 0.25
    out = s.guided(build_guider("flowchef", loss=loss, step_size=step))(s.x_t, T, LABELS, W)
    assert seen == [(True, True)]  # a detached leaf: no graph back to the network
    d_c = s.D(LABELS)
    delta = -step * (d_c - target)
    s.close(out.x0, d_c + delta)
    s.close(out.eps, s.eps(d_c) + delta)
    s.close(out.x_t, s.x_t + delta)
    # DDIM on rectified flow lands on FlowChef's update: x' = (x_t + delta) + dt * v, v unchanged
    t_next = T - 0.1
    x_next = ddim_step(out, s.x_t, t_next, s.schedule)
    v = s.eps(d_c) - d_c
    s.close(x_next, s.x_t + delta + col(t_next - T, v) * v)
    two = s.guided(build_guider("flowchef", loss=loss, step_size=step, iterations=2))(s.x_t, T, LABELS, W)
    s.close(two.x0, target + (1 - step) ** 2 * (d_c - target))


def test_flowchef_wraps_a_guided_inner_rule():
    s = Setup()
    loss = lambda x0: (x0**2).sum()  # noqa: E731
    out = s.guided(build_guider("flowchef", loss=loss, step_size=0.1, inner={"name": "cfg"}))(s.x_t, T, LABELS, W)
    d_c, d_u = s.D(LABELS), s.D(NULL)
    d = d_u + col(W, d_c) * (d_c - d_u)
    s.close(out.x0, d - 0.1 * 2 * d)


def test_interval_gates_per_sample_in_t_with_half_open_bounds():
    s = Setup()
    g = build_guider("interval", t_lo=0.5, t_hi=0.75)  # open for t in (0.5, 0.75]: samples 1 and 2
    out = s.guided(g)(s.x_t, T, LABELS, W)
    d_c, d_u = s.D(LABELS), s.D(NULL)
    cfg = d_u + col(W, d_c) * (d_c - d_u)
    inside = torch.tensor([False, True, True, False])
    s.close(out.x0, torch.where(col(inside, d_c), cfg, d_c))
    s.close(out.eps, s.eps(out.x0), 1e-9)


def test_interval_gates_in_noise_level_sigma_over_alpha():
    s = Setup(EDM(), "edm")
    lo, hi = float(s.sigma[0]), float(s.sigma[2])  # EDM: alpha = 1, so the level is sigma
    out = s.guided(build_guider("interval", sigma_lo=lo, sigma_hi=hi))(s.x_t, T, LABELS, W)
    d_c, d_u = s.D(LABELS), s.D(NULL)
    inside = torch.tensor([False, True, True, False])  # (lo, hi]: lo excluded, hi included
    s.close(out.x0, torch.where(col(inside, d_c), d_u + col(W, d_c) * (d_c - d_u), d_c), 1e-9)
    vp = Setup(VPLinear(), "eps")  # VP: level = sigma / alpha
    level = vp.sigma / vp.alpha
    g = build_guider("interval", sigma_lo=float(level[1]) * 0.99, sigma_hi=float(level[2]) * 1.01)
    assert g.gate(T, vp.alpha, vp.sigma).tolist() == [False, True, True, False]


def test_interval_with_nested_apg_from_dict_config():
    g = build_guider("interval", sigma_lo=0.3, sigma_hi=5.0, inner={"name": "apg", "eta": 0.0})
    assert g.inner.name == "apg" and g.inner.eta == 0.0 and g.stateful
    assert isinstance(g.init_state(4), dict) and "avg" in g.init_state(4)
    s = Setup(EDM(), "edm")
    state = g.init_state(4)
    pred, state = s.guided(g).guide(s.x_t, T, LABELS, W, state=state)
    assert state["avg"].shape == s.x_t.shape


def test_rescale_formula_and_endpoints():
    s = Setup(VPLinear(), "v")
    d_c, d_u = s.D(LABELS), s.D(NULL)
    cfg = s.guided(build_guider("cfg"))(s.x_t, T, LABELS, W)
    zero = s.guided(build_guider("rescale", phi=0.0))(s.x_t, T, LABELS, W)
    s.close(zero.x0, cfg.x0)
    full = s.guided(build_guider("rescale", phi=1.0))(s.x_t, T, LABELS, W)
    v_c = Prediction.from_x0(d_c, s.x_t, col(s.alpha, d_c), col(s.sigma, d_c)).read("v")
    assert torch.allclose(full.read("v").flatten(1).std(1), v_c.flatten(1).std(1), atol=1e-10)
    part = s.guided(build_guider("rescale", phi=0.7))(s.x_t, T, LABELS, W)
    y = cfg.read("v")
    ratio = v_c.flatten(1).std(1) / y.flatten(1).std(1)
    s.close(part.read("v"), 0.7 * y * col(ratio, y) + 0.3 * y)


def test_rescale_around_cfg_pp_keeps_uncond_eps():
    s = Setup()
    out = s.guided(build_guider("rescale", inner={"name": "cfg_pp", "lam": 0.5}))(s.x_t, T, LABELS, W)
    s.close(out.eps, s.eps(s.D(NULL)))


def test_apg_single_step_formula_without_state():
    s = Setup()
    r = 2.0
    out = s.guided(build_guider("apg", r=r, eta=0.25))(s.x_t, T, LABELS, W)
    d_c, d_u = s.D(LABELS), s.D(NULL)
    for b in range(len(LABELS)):
        delta = d_c[b] - d_u[b]
        delta = delta * min(1.0, r / delta.norm().item())
        par = (delta * d_c[b]).sum() / (d_c[b] * d_c[b]).sum() * d_c[b]
        s.close(out.x0[b], d_c[b] + (W[b] - 1) * ((delta - par) + 0.25 * par))


def test_cfg_zero_star_formula_in_flow_space():
    s = Setup()
    out = s.guided(build_guider("cfg_zero_star"))(s.x_t, T, LABELS, W)  # no state: no zero-init
    v_c, v_u = s.eps(s.D(LABELS)) - s.D(LABELS), s.eps(s.D(NULL)) - s.D(NULL)
    st = (v_c * v_u).flatten(1).sum(1) / (v_u * v_u).flatten(1).sum(1)
    v = col(st, v_u) * v_u + col(W, v_c) * (v_c - col(st, v_u) * v_u)
    s.close(out.read("flow"), v, 1e-9)


def test_registry_lists_every_guider_with_doc_and_params():
    names = {n for n, _, _ in list_guiders()}
    assert names == set(GUIDERS) == {"conditional", "cfg", "rescale", "perp_neg", "cfg_pp", "apg", "interval",
                                     "adaptive", "autoguidance", "cfg_zero_star", "classifier", "gfcg",
                                     "flowchef", "pag"}
    for name, doc, params in list_guiders():
        assert doc and not doc.endswith(("the", "for", "of", ",")), (name, doc)
        assert isinstance(params, dict)
    desc = build_guider("rescale", inner={"name": "interval", "t_lo": 0.1, "t_hi": 0.9}).describe()
    assert desc["inner"]["name"] == "interval" and desc["inner"]["inner"]["name"] == "cfg"


def test_combine_called_directly_with_hand_built_context():
    x_t = torch.randn(2, 1, 2, 2, dtype=DT)
    a, sg = torch.full((2, 1, 1, 1), 0.6, dtype=DT), torch.full((2, 1, 1, 1), 0.8, dtype=DT)
    pc = Prediction.from_x0(torch.ones_like(x_t), x_t, a, sg)
    pu = Prediction.from_x0(torch.zeros_like(x_t), x_t, a, sg)
    ctx = GuideContext(x_t=x_t, t=torch.full((2,), 0.5, dtype=DT), alpha=a, sigma=sg, w=torch.tensor([2.0, 3.0]))
    out, state = build_guider("cfg").combine({"cond": pc, "uncond": pu}, ctx)
    assert out.x0[:, 0, 0, 0].tolist() == [2.0, 3.0] and state is None


@pytest.mark.parametrize("name,params,match", [
    ("cfg", {"space": "score"}, "space must be one of"),
    ("cfg", {"convention": "imagen"}, "unknown CFG convention"),
    ("rescale", {"phi": 1.5}, "phi must be in"),
    ("rescale", {"inner": {"eta": 0.0}}, "needs a 'name'"),
    ("rescale", {"inner": 3}, "inner must be"),
    ("rescale", {"inner": {"name": "gfcg", "classifier": len}, "space": "x0"}, None),
    ("perp_neg", {"neg_weights": []}, "one weight per negative"),
    ("perp_neg", {"neg_weights": [1.0, -0.5]}, "must be >= 0"),
    ("cfg_pp", {"lam": 1.5}, r"lam must be in \[0, 1\]"),
    ("apg", {"beta": 1.0}, r"momentum beta must be in \(-1, 1\)"),
    ("apg", {"beta": -1.5}, r"momentum beta must be in \(-1, 1\)"),
    ("apg", {"r": -1.0}, "norm threshold r must be a positive"),
    ("apg", {"eta": 2.0}, r"eta must be in \[0, 1\]"),
    ("apg", {"space": "latent"}, "space must be one of"),
    ("interval", {"sigma_lo": 5.0, "sigma_hi": 0.3}, "swap them if reversed"),
    ("interval", {"sigma_lo": 0.3}, "give both sigma_lo and sigma_hi"),
    ("interval", {"sigma_lo": 0.3, "sigma_hi": 5.0, "t_lo": 0.1, "t_hi": 0.2}, "exactly one gate"),
    ("interval", {}, "exactly one gate"),
    ("interval", {"t_lo": 0.2, "t_hi": 1.5}, "t_hi must be <= 1"),
    ("interval", {"t_lo": 0.2, "t_hi": 0.5, "inner": {"name": "classifier", "classifier": len}}, "no 'cond' branch"),
    ("adaptive", {"gamma": 1.0}, r"must be in \(0, 1\)"),
    ("adaptive", {"gamma": -0.2}, r"must be in \(0, 1\)"),
    ("adaptive", {"min_steps": -1}, "min_steps must be an integer >= 0"),
    ("cfg_zero_star", {"zero_init_steps": -1}, "zero_init_steps must be an integer >= 0"),
    ("classifier", {"classifier": None}, "give a callable classifier"),
    ("classifier", {"classifier": len, "base": "uncond"}, "base must be 'cond'"),
    ("gfcg", {"classifier": 3}, "give a callable classifier"),
    ("flowchef", {"loss": len, "step_size": -0.1}, "step_size must be > 0"),
    ("flowchef", {"loss": len, "iterations": 0}, "iterations must be an integer >= 1"),
    ("flowchef", {"loss": None}, "give a callable loss"),
    ("pag", {"pag_scale": -1.0}, "pag_scale must be >= 0"),
    ("nope", {}, "unknown guider 'nope'"),
    ("apg", {"momentum": 0.5}, "has no parameter"),
    ("apg", {"eta": "xyz"}, "parameter eta must be a number, got 'xyz'"),  # e.g. --param eta=xyz
    ("cfg_zero_star", {"optimized_scale": "xyz"}, "optimized_scale must be true or false"),
    ("perp_neg", {"neg_weights": [1.0, "a"]}, "neg_weights must be a list of numbers"),
    ("adaptive", {"min_steps": 1.5}, "min_steps must be an integer"),
    ("classifier", {}, "usable from Python only"),
    ("gfcg", {}, "usable from Python only"),
    ("flowchef", {}, "usable from Python only"),
])
def test_bad_parameters_raise_at_construction(name, params, match):
    if match is None:  # valid nesting builds fine
        build_guider(name, **params)
        return
    with pytest.raises(ValueError, match=match):
        build_guider(name, **params)


def test_the_guider_list_marks_the_python_only_guiders():
    from guidance.guiders import list_guiders

    marked = {name for name, doc, _ in list_guiders() if "Python only" in doc}
    assert marked == {"classifier", "gfcg", "flowchef"}
