"""GuidedDenoiser and teacher_target: branch batching, NFE accounting, per-sample scales, negative
conditions, CFG conventions and the no-grad distillation target."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from guidance.denoiser import Denoiser
from guidance.guided import GuidedDenoiser, teacher_target
from guidance.guiders import CFG, Branch, Conditional, Guider, build_guider
from guidance.guiders.cfg import to_our_scale
from guidance.parameterization import Prediction
from guidance.samplers import sample
from guidance.schedules import RectifiedFlow, VPLinear

K = 5  # classes; label K is the null condition
B, C, H, W = 4, 2, 3, 3
SPACES = ("x0", "eps", "v", "flow")


class ToyNet(nn.Module):
    """Class-conditional eps network, nonlinear in x, that records every forward call.

    x [N, C, H, W], net_time [N], cond [N] long (K = null) -> [N, C, H, W].
    """

    def __init__(self, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Parameter(torch.randn(K + 1, C, generator=g, dtype=dtype))
        self.gain = nn.Parameter(torch.tensor(0.7, dtype=dtype))
        self.calls, self.batch_sizes, self.conds, self.kwargs = 0, [], [], []

    def forward(self, x, net_time, cond, **kwargs):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        self.conds.append(cond.clone())
        self.kwargs.append(kwargs)
        tt = (net_time / 1000).reshape(-1, 1, 1, 1)
        out = self.gain * torch.tanh(x) * (0.5 + tt) + self.emb[cond][:, :, None, None] * (1 - 0.5 * tt)
        if kwargs.get("perturb") == "pag":
            out = out + 0.25
        return out

    def null_cond(self, cond):
        return torch.full_like(cond, K)

    def reset(self):
        self.calls, self.batch_sizes, self.conds, self.kwargs = 0, [], [], []


def make(guider=None, batch_branches=True, schedule=None, kind="eps"):
    net = ToyNet()
    den = Denoiser(net, schedule or VPLinear(), kind)
    return GuidedDenoiser(den, guider or CFG(), batch_branches=batch_branches), net, den


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.35, 0.6, 0.9], dtype=torch.float64)
    c = torch.tensor([0, 3, 1, 4])
    return x, t, c


def close(a, b, tol=1e-12):
    torch.testing.assert_close(a, b, rtol=0, atol=tol)


def hand_x0(net, sch, x, t, cond):
    """x0 from the eps network by hand: (x_t - sigma eps) / alpha."""
    with torch.no_grad():
        eps = net(x, sch.net_time(t), cond)
    a, s = sch.alpha_sigma(t)
    return (x - s.reshape(-1, 1, 1, 1) * eps) / a.reshape(-1, 1, 1, 1)


# ---------------------------------------------------------------- batching and NFE

def test_cfg_branches_run_as_one_batched_forward():
    g, net, _ = make()
    x, t, c = inputs()
    g(x, t, c, 3.0)
    assert net.calls == 1 and net.batch_sizes == [2 * B]
    assert torch.equal(net.conds[0], torch.cat([c, torch.full_like(c, K)]))


def test_sequential_branches_run_one_forward_each():
    g, net, _ = make(batch_branches=False)
    x, t, c = inputs()
    g(x, t, c, 3.0)
    assert net.calls == 2 and net.batch_sizes == [B, B]
    assert sorted(tuple(cc.tolist()) for cc in net.conds) == sorted([tuple(c.tolist()), (K,) * B])


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0, torch.tensor([0.0, 1.5, 4.0, -1.0], dtype=torch.float64)])
def test_batched_and_sequential_results_are_equal(w):
    x, t, c = inputs(1)
    p_b = make(batch_branches=True)[0](x, t, c, w)
    p_s = make(batch_branches=False)[0](x, t, c, w)
    close(p_b.x0, p_s.x0), close(p_b.eps, p_s.eps)
    close(p_b.alpha, p_s.alpha), close(p_b.sigma, p_s.sigma), close(p_b.x_t, p_s.x_t)


@pytest.mark.parametrize("batch_branches", [True, False])
def test_nfe_counts_branches_per_call(batch_branches):
    g, net, _ = make(batch_branches=batch_branches)
    x, t, c = inputs()
    assert g.nfe == 0
    g(x, t, c, 2.0)
    assert g.nfe == 2
    g(x, t, c, 2.0)
    g(x, t, c, 2.0)
    assert g.nfe == 6
    g.reset_nfe()
    assert g.nfe == 0
    g1, _, _ = make(Conditional(), batch_branches=batch_branches)
    g1(x, t, c, 2.0)
    g1(x, t, c, 2.0)
    assert g1.nfe == 2


def test_sampler_loop_costs_one_batched_forward_and_two_evaluations_per_step():
    g, net, _ = make()
    x, _, c = inputs()
    sample(g, x, c, 4.0, steps=6, sampler="ddim")
    assert net.calls == 6 and g.nfe == 12 and set(net.batch_sizes) == {2 * B}


def test_perturbed_branches_are_never_batched():
    class PerturbedGuider(Guider):
        name = "toy_pag"

        def branches(self, state=None):
            return [Branch("cond"), Branch("uncond", "uncond"), Branch("ptb", "cond", perturb="pag")]

        def combine(self, preds, ctx):
            return preds["ptb"], ctx.state

    g, net, den = make(PerturbedGuider())
    x, t, c = inputs()
    out = g(x, t, c, 1.0)
    assert net.calls == 2 and sorted(net.batch_sizes) == [B, 2 * B] and g.nfe == 3
    assert {"perturb": "pag"} in net.kwargs
    net.reset()
    ref = den(x, t, c, perturb="pag")
    close(out.x0, ref.x0)


# ---------------------------------------------------------------- the CFG rule

def test_cfg_matches_the_hand_formula():
    """D = D_u + w (D_c - D_u) (Ho & Salimans 2022, Eq. 6, this project's convention), from x0 computed by hand."""
    g, net, den = make()
    x, t, c = inputs(2)
    w = 2.5
    out = g(x, t, c, w)
    x0_c, x0_u = hand_x0(net, den.schedule, x, t, c), hand_x0(net, den.schedule, x, t, torch.full_like(c, K))
    close(out.x0, x0_u + w * (x0_c - x0_u))
    a, s = den.schedule.alpha_sigma(t)
    close(out.eps, (x - a.reshape(-1, 1, 1, 1) * out.x0) / s.reshape(-1, 1, 1, 1), 1e-10)


def test_cfg_scale_keeps_float64_precision():
    """A scale that float32 cannot represent (0.3) must not be rounded when x_t is float64."""
    g, net, den = make()
    x, t, c = inputs(2)
    w = 0.3
    out = g(x, t, c, w)
    x0_c, x0_u = hand_x0(net, den.schedule, x, t, c), hand_x0(net, den.schedule, x, t, torch.full_like(c, K))
    close(out.x0, x0_u + w * (x0_c - x0_u))


def test_guide_context_alpha_sigma_keep_float64_precision():
    """Guiders that read ctx.alpha / ctx.sigma (gates, rules in other spaces) see them at x_t's precision."""
    seen = {}

    class Capture(Conditional):
        name = "capture"

        def combine(self, preds, ctx):
            seen["ctx"], seen["pred"] = ctx, preds["cond"]
            return preds["cond"], ctx.state

    g, _, _ = make(Capture())
    x, t, c = inputs()
    g(x, t, c, 1.0)
    ctx, pred = seen["ctx"], seen["pred"]
    assert ctx.alpha.dtype == ctx.sigma.dtype == torch.float64
    close(ctx.alpha, pred.alpha, 0), close(ctx.sigma, pred.sigma, 0)


def test_w1_is_the_conditional_branch_and_w0_the_unconditional():
    g, _, den = make()
    x, t, c = inputs(3)
    d_c, d_u = den(x, t, c), den(x, t, torch.full_like(c, K))
    close(g(x, t, c, 1.0).x0, d_c.x0), close(g(x, t, c, 1.0).eps, d_c.eps, 1e-10)
    close(g(x, t, c, 0.0).x0, d_u.x0), close(g(x, t, c, 0.0).eps, d_u.eps, 1e-10)
    close(make(Conditional())[0](x, t, c, 7.0).x0, d_c.x0)  # the plain rule ignores w
    # erasure target (ESD): w = -eta moves away from the condition
    close(g(x, t, c, -1.0).x0, 2 * d_u.x0 - d_c.x0)


@pytest.mark.parametrize("w", [0.0, 1.0, 4.5, torch.tensor([1.0, 2.0, 7.5, 0.0], dtype=torch.float64)])
def test_original_convention_with_w_minus_1_equals_ours_with_w(w):
    x, t, c = inputs(4)
    ours = make(CFG(convention="ours"))[0](x, t, c, w)
    original = make(build_guider("cfg", convention="original"))[0](x, t, c, w - 1)
    close(original.x0, ours.x0), close(original.eps, ours.eps, 1e-10)
    assert to_our_scale(2.0, "original") == 3.0 and to_our_scale(2.0, "ours") == 2.0


def test_unknown_cfg_convention_and_guider_are_rejected():
    with pytest.raises(ValueError, match="unknown CFG convention 'paper'"):
        CFG(convention="paper")
    with pytest.raises(ValueError, match=r"unknown guider 'cgf'; available: .*cfg"):
        build_guider("cgf")
    with pytest.raises(ValueError, match="has no parameter"):
        build_guider("cfg", scale=3.0)
    with pytest.raises(ValueError, match="space must be one of"):
        CFG(space="edm")


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
def test_cfg_gives_the_same_result_in_every_space(kind):
    x, t, c = inputs(5)
    ref = make(CFG(space="x0"), kind=kind)[0](x, t, c, 3.5)
    for space in SPACES[1:]:
        out = make(CFG(space=space), kind=kind)[0](x, t, c, 3.5)
        close(out.x0, ref.x0, 1e-10), close(out.eps, ref.eps, 1e-9)


# ---------------------------------------------------------------- per-sample scales and times

@pytest.mark.parametrize("batch_branches", [True, False])
def test_per_sample_w_equals_separate_scalar_calls(batch_branches):
    g, _, _ = make(batch_branches=batch_branches)
    x, t, c = inputs(6)
    w = torch.tensor([0.0, 1.0, 2.5, -1.0], dtype=torch.float64)
    out = g(x, t, c, w)
    for i in range(B):
        one = g(x[i : i + 1], t[i : i + 1], c[i : i + 1], float(w[i]))
        close(out.x0[i : i + 1], one.x0), close(out.eps[i : i + 1], one.eps, 1e-10)
    # and the scales really differ per sample: a shared scale gives a different result
    assert (g(x, t, c, 2.5).x0 - out.x0).abs().amax(dim=(1, 2, 3))[[0, 1, 3]].min() > 1e-3


def test_scalar_t_is_broadcast_to_the_batch():
    g, _, _ = make()
    x, _, c = inputs(7)
    a = g(x, 0.4, c, 2.0)
    b = g(x, torch.full((B,), 0.4, dtype=torch.float64), c, 2.0)
    close(a.x0, b.x0), close(a.sigma, b.sigma)


# ---------------------------------------------------------------- negative conditions

def test_negative_condition_replaces_the_null_branch():
    g, net, den = make()
    x, t, c = inputs(8)
    neg = torch.tensor([2, 2, 0, 1])
    w = 4.0
    out = g(x, t, c, w, neg_cond=neg)
    assert torch.equal(net.conds[-1], torch.cat([c, neg]))  # the null label K is never used
    net.reset()
    d_c, d_n = den(x, t, c), den(x, t, neg)
    close(out.x0, d_n.x0 + w * (d_c.x0 - d_n.x0))
    assert (out.x0 - g(x, t, c, w).x0).abs().max() > 1e-3
    # a list of negatives: the "uncond" branch takes the first
    close(g(x, t, c, w, neg_cond=[neg, torch.zeros_like(neg)]).x0, out.x0)


def test_indexed_negative_branches_and_their_errors():
    class TwoNeg(Guider):
        name = "two_neg"

        def branches(self, state=None):
            return [Branch("cond"), Branch("n0", "neg:0"), Branch("n1", "neg:1")]

        def combine(self, preds, ctx):
            y = preds["cond"].x0 + preds["n0"].x0 - preds["n1"].x0
            return Prediction.from_x0(y, preds["cond"].x_t, preds["cond"].alpha, preds["cond"].sigma), ctx.state

    g, net, den = make(TwoNeg())
    x, t, c = inputs(9)
    n0, n1 = torch.tensor([1, 1, 1, 1]), torch.tensor([2, 3, 4, 0])
    out = g(x, t, c, 1.0, neg_cond=[n0, n1])
    assert net.calls == 1 and torch.equal(net.conds[0], torch.cat([c, n0, n1]))
    close(out.x0, den(x, t, c).x0 + den(x, t, n0).x0 - den(x, t, n1).x0)
    with pytest.raises(ValueError, match="needs negative conditions"):
        g(x, t, c, 1.0)
    with pytest.raises(ValueError, match=r"asks for negative #1 but only 1 were given"):
        g(x, t, c, 1.0, neg_cond=[n0])


def test_a_guider_with_a_weak_branch_needs_a_weak_model():
    class WeakGuider(Guider):
        name = "toy_auto"

        def branches(self, state=None):
            return [Branch("cond"), Branch("weak", "cond", model="weak")]

        def combine(self, preds, ctx):
            return preds["weak"], ctx.state

    den = Denoiser(ToyNet(), VPLinear(), "eps")
    with pytest.raises(ValueError, match="needs a weak model"):
        GuidedDenoiser(den, WeakGuider())
    weak_net = ToyNet()
    with torch.no_grad():
        weak_net.emb.mul_(0.5)
    g = GuidedDenoiser(den, WeakGuider(), weak=Denoiser(weak_net, VPLinear(), "eps"))
    x, t, c = inputs(10)
    close(g(x, t, c, 2.0).x0, Denoiser(weak_net, VPLinear(), "eps")(x, t, c).x0)
    assert weak_net.calls >= 1


def test_dict_conditions_are_batched():
    class DictNet(ToyNet):
        def forward(self, x, net_time, cond, **kw):
            return super().forward(x, net_time, cond["label"], **kw)

        def null_cond(self, cond):
            return {"label": torch.full_like(cond["label"], K)}

    net = DictNet()
    g = GuidedDenoiser(Denoiser(net, VPLinear(), "eps"), CFG())
    x, t, c = inputs(11)
    out = g(x, t, {"label": c}, 3.0)
    assert net.calls == 1
    ref = make()[0](x, t, c, 3.0)
    close(out.x0, ref.x0)


# ---------------------------------------------------------------- teacher_target

@pytest.mark.parametrize("space", SPACES)
def test_teacher_target_is_the_guided_prediction_without_grad(space):
    g, net, _ = make(schedule=RectifiedFlow(), kind="flow")
    x, t, c = inputs(12)
    x = x.requires_grad_(True)
    w = torch.tensor([1.0, 3.0, 5.0, 0.0], dtype=torch.float64)
    with_grad = g(x, t, c, w).read(space)
    assert with_grad.requires_grad  # so the check below can fail
    target = teacher_target(g, x, t, c, w, space=space)
    assert not target.requires_grad and target.grad_fn is None
    assert target.shape == x.shape and target.dtype == torch.float64
    close(target, with_grad.detach())
    # and the target really is in `space`: for the flow teacher, "flow" reads back the guided velocity
    if space == "flow":
        with torch.no_grad():
            u_c = net(x, g.schedule.net_time(t), c)
            u_u = net(x, g.schedule.net_time(t), torch.full_like(c, K))
        close(target, u_u + w.reshape(-1, 1, 1, 1) * (u_c - u_u), 1e-10)


def test_teacher_target_with_negative_condition_and_erasure_scale():
    g, _, den = make()
    x, t, c = inputs(13)
    neg = torch.tensor([3, 3, 3, 3])
    close(teacher_target(g, x, t, c, 2.0, space="eps", neg_cond=neg), g(x, t, c, 2.0, neg_cond=neg).read("eps").detach())
    # ESD target with eta = 1: eps_null - (eps_c - eps_null)
    eps_c, eps_u = den(x, t, c).eps, den(x, t, torch.full_like(c, K)).eps
    close(teacher_target(g, x, t, c, -1.0, space="eps"), (eps_u - (eps_c - eps_u)).detach(), 1e-10)


def test_float32_inputs_give_float32_targets():
    net = ToyNet(dtype=torch.float32)
    g = GuidedDenoiser(Denoiser(net, VPLinear(), "eps"), CFG())
    x, t, c = inputs()
    out = teacher_target(g, x.float(), t.float(), c, 3.0, space="v")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
