"""Which guiders depend on the space (x0, eps, v, flow) they combine in.

Every space is y = A x0 + B x_t with the same per-sample A, B for all branches. An affine rule
(weights summing to 1) maps through unchanged, and so does any rule built from differences of
predictions that is homogeneous of degree 1 in them (Perp-Neg's projections). Rules that look at
a prediction itself, or at an absolute norm, are not: rescale (std of y), APG (norm threshold,
projection on D_c), CFG-Zero* (s* from v_c, v_u, zero velocity).
"""
from __future__ import annotations

import pytest
import torch

from guidance.guided import GuidedDenoiser
from guidance.guiders import build_guider
from guidance.guiders.base import SPACES
from guidance.schedules import VPCosine, VPLinear
from tests.guidance.gmm import GaussianMixture, gmm_denoiser

DT = torch.float64
LABELS = torch.tensor([0, 1, 2, 1])
T = torch.tensor([0.5, 0.6, 0.75, 0.9], dtype=DT)
W = torch.tensor([0.5, 2.0, 3.0, 5.0])


def guided_x0(name, space, schedule=None, **params):
    """The guided D for guider `name` combined in `space`, on the exact mixture denoiser."""
    schedule = VPLinear() if schedule is None else schedule
    gmm = GaussianMixture.random(seed=3, spread=0.5)
    den = gmm_denoiser(gmm, schedule, "eps")
    weak = gmm_denoiser(gmm.widened(1.3), schedule, "v")
    x_t = torch.randn(len(LABELS), *gmm.shape, generator=torch.Generator().manual_seed(4), dtype=DT)
    if name == "gfcg":
        params["classifier"] = gmm.clean_classifier()
    guider = build_guider(name, space=space, **params)
    guided = GuidedDenoiser(den, guider, weak=weak if name == "autoguidance" else None)
    neg = [torch.tensor([1, 2, 0, 0]), torch.tensor([2, 0, 1, 0])]
    pred, _ = guided.guide(x_t, T, LABELS, W, neg_cond=neg if name == "perp_neg" else None,
                           state=guider.init_state(len(LABELS)))
    return pred


AFFINE = [("cfg", {}), ("cfg", {"convention": "original"}), ("cfg_pp", {"lam": 0.5}), ("autoguidance", {}),
          ("pag", {"pag_scale": 1.5}), ("adaptive", {"gamma": 0.5}), ("gfcg", {}),
          ("perp_neg", {"neg_weights": [1.0, 0.5]})]


@pytest.mark.parametrize("name,params", AFFINE, ids=[f"{n}{i}" for i, (n, _) in enumerate(AFFINE)])
def test_affine_and_homogeneous_guiders_are_the_same_in_every_space(name, params):
    ref = guided_x0(name, "x0", **params)
    for space in SPACES[1:]:
        other = guided_x0(name, space, **params)
        assert torch.allclose(other.x0, ref.x0, atol=1e-9), (space, (other.x0 - ref.x0).abs().max())
        assert torch.allclose(other.eps, ref.eps, atol=1e-8)


@pytest.mark.parametrize("name,params", [("rescale", {"phi": 0.7}), ("apg", {"r": 1.0, "eta": 0.0}),
                                         ("cfg_zero_star", {"zero_init_steps": 0})])
def test_nonlinear_guiders_depend_on_their_space(name, params):
    """Documents the choice each of these makes: rescale defaults to v (paper), APG to x0 (paper's D),
    CFG-Zero* to flow (paper's velocity). Moving them to another space changes D noticeably."""
    preds = {space: guided_x0(name, space, schedule=VPCosine(), **params).x0 for space in SPACES}
    for space in SPACES[1:]:
        assert (preds[space] - preds["x0"]).abs().max() > 1e-3, space
