"""An independent implementation: our guiders against `diffusers.guiders` on the same tensors.

Conventions converted at the edge:
- diffusers' default CFG is D_u + s (D_c - D_u) (ours, w = s); `use_original_formulation=True` is
  D_c + s (D_c - D_u) (our convention="original").
- diffusers' APG with `use_original_formulation=True` is D_c + s * update, so s = w - 1 (the paper's
  form); its default form adds the update to D_u, which is not the paper's rule. Its
  `adaptive_projected_guidance_rescale` is our norm threshold r, its momentum our beta.
- diffusers' CFG-Zero* multiplies the unconditional prediction by s* and zeroes `pred` for
  `_step < zero_init_steps`; ours counts steps in explicit state.
- diffusers' AutoGuidance builds its weak prediction by skipping layers; its combination,
  D_weak + s (D_main - D_weak), is compared with `pred_uncond` = D_weak.
diffusers works on whatever tensors it is given, so each comparison feeds it the branch values in the
guider's own space.
"""
from __future__ import annotations

import pytest
import torch

diffusers_guiders = pytest.importorskip("diffusers.guiders")
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer  # noqa: E402

from guidance.guiders import build_guider  # noqa: E402
from guidance.guiders.base import GuideContext  # noqa: E402
from guidance.parameterization import Prediction  # noqa: E402

DT = torch.float64
B = 3
TOL = 1e-5


class Branches:
    """Random branch values in `space` at a random (x_t, alpha, sigma), as Predictions and raw tensors."""

    def __init__(self, space, names=("cond", "uncond"), seed=0, shape=(B, 4, 8, 8)):
        g = torch.Generator().manual_seed(seed)
        self.space = space
        self.x_t = torch.randn(shape, generator=g, dtype=DT)
        self.alpha = (0.3 + 0.6 * torch.rand(B, generator=g, dtype=DT)).reshape(B, 1, 1, 1)
        self.sigma = (1 - self.alpha**2).sqrt()
        like = Prediction.from_x0(self.x_t, self.x_t, self.alpha, self.sigma)
        self.raw = {n: torch.randn(shape, generator=g, dtype=DT) for n in names}
        self.raw["cond"] = self.raw["cond"] + 0.5 * self.raw.get("uncond", 0)  # correlated, as real branches
        self.preds = {n: Prediction.from_space(y, space, like) for n, y in self.raw.items()}

    def ctx(self, w, state=None):
        w = torch.full((B,), float(w), dtype=DT)
        return GuideContext(x_t=self.x_t, t=torch.full((B,), 0.5, dtype=DT), alpha=self.alpha, sigma=self.sigma,
                            w=w, state=state)


def close(a, b):
    assert torch.allclose(a.to(DT), b.to(DT), atol=TOL, rtol=TOL), (a - b).abs().max().item()


@pytest.mark.parametrize("space", ["eps", "v", "flow", "x0"])
@pytest.mark.parametrize("w", [0.0, 1.0, 4.5])
def test_cfg_matches_diffusers_both_conventions(space, w):
    br = Branches(space)
    ours, _ = build_guider("cfg", space=space).combine(br.preds, br.ctx(w))
    theirs = diffusers_guiders.ClassifierFreeGuidance(guidance_scale=w).forward(br.raw["cond"], br.raw["uncond"])
    close(ours.read(space), theirs.pred)
    ours, _ = build_guider("cfg", convention="original", space=space).combine(br.preds, br.ctx(w))
    theirs = diffusers_guiders.ClassifierFreeGuidance(guidance_scale=w, use_original_formulation=True)
    close(ours.read(space), theirs.forward(br.raw["cond"], br.raw["uncond"]).pred)


@pytest.mark.parametrize("space", ["eps", "v"])
@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_rescale_around_cfg_matches_diffusers_guidance_rescale(space, phi):
    br = Branches(space)
    ours, _ = build_guider("rescale", phi=phi, space=space, inner={"name": "cfg", "space": space}).combine(
        br.preds, br.ctx(7.5))
    theirs = diffusers_guiders.ClassifierFreeGuidance(guidance_scale=7.5, guidance_rescale=phi)
    close(ours.read(space), theirs.forward(br.raw["cond"], br.raw["uncond"]).pred)


@pytest.mark.parametrize("beta,r,eta", [(-0.5, 2.0, 0.0), (0.0, None, 1.0), (-0.75, 20.0, 0.25)])
def test_apg_matches_diffusers_over_several_steps(beta, r, eta):
    w = 5.0
    guider = build_guider("apg", beta=beta, r=r, eta=eta)
    theirs = diffusers_guiders.AdaptiveProjectedGuidance(
        guidance_scale=w - 1, adaptive_projected_guidance_momentum=beta if beta else None,
        adaptive_projected_guidance_rescale=r or 0.0, eta=eta, use_original_formulation=True)
    theirs.momentum_buffer = MomentumBuffer(beta) if beta else None  # what prepare_inputs does at step 0
    state = guider.init_state(B)
    for step in range(4):
        br = Branches("x0", seed=step)
        ours, state = guider.combine(br.preds, br.ctx(w, state))
        close(ours.x0, theirs.forward(br.raw["cond"], br.raw["uncond"]).pred)
        if beta:
            close(state["avg"], theirs.momentum_buffer.running_average)


def test_cfg_zero_star_matches_diffusers_including_zero_init():
    w, k, steps = 4.0, 2, 5
    guider = build_guider("cfg_zero_star", zero_init_steps=k)
    theirs = diffusers_guiders.ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=k)
    state = guider.init_state(B)
    for step in range(steps):
        br = Branches("flow", seed=10 + step)
        theirs.set_state(step=step, num_inference_steps=steps, timestep=torch.tensor(999 - step))
        expected = theirs.forward(br.raw["cond"], br.raw["uncond"]).pred
        preds = br.preds if guider.branches(state) else {}
        ours, state = guider.combine(preds, br.ctx(w, state))
        close(ours.read("flow"), expected)
    assert state["step"] == steps


@pytest.mark.parametrize("w", [0.5, 2.0, 3.0])
def test_autoguidance_combination_matches_diffusers(w):
    br = Branches("eps", names=("cond", "weak"))
    ours, _ = build_guider("autoguidance", space="eps").combine(br.preds, br.ctx(w))
    theirs = diffusers_guiders.AutoGuidance(guidance_scale=w, auto_guidance_layers=[0], dropout=1.0)
    close(ours.read("eps"), theirs.forward(br.raw["cond"], br.raw["weak"]).pred)


@pytest.mark.parametrize("w,s", [(3.0, 2.0), (5.0, 0.5)])
def test_pag_combination_matches_diffusers(w, s):
    br = Branches("eps", names=("cond", "uncond", "ptb"))
    ours, _ = build_guider("pag", pag_scale=s, space="eps").combine(br.preds, br.ctx(w))
    theirs = diffusers_guiders.PerturbedAttentionGuidance(
        guidance_scale=w, perturbed_guidance_scale=s, perturbed_guidance_layers=[0],
        perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0)
    close(ours.read("eps"), theirs.forward(br.raw["cond"], br.raw["uncond"], br.raw["ptb"]).pred)
