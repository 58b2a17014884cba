"""Guidance rescale (Lin et al. 2024) as a wrapper around any guider that has a conditional branch."""
from __future__ import annotations

import torch

from guidance.guiders.base import GuideContext, Guider, Wrapper
from guidance.guiders.cfg import CFG
from guidance.parameterization import Prediction


class Rescale(Wrapper):
    """Guidance rescale: pull the guided prediction's per-sample std back to the conditional one's.

    phi:   mixing factor in [0, 1] (0 = the inner guider unchanged; the paper uses 0.7).
    inner: the guider whose result is rescaled (default CFG; "rescale around CFG").
    space: where the std is measured; the paper works in v space (its default here). The rule is not
           affine, so the result depends on the space (see tests/guidance/test_guiders_spaces.py).
    Tensors are [B, C, H, W]; the std runs over all non-batch dims, one value per sample.
    """

    name = "rescale"

    def __init__(self, phi: float = 0.7, inner: Guider | None = None, space: str = "v"):
        super().__init__(CFG() if inner is None else inner, space)
        if not 0.0 <= phi <= 1.0:
            raise ValueError(f"rescale: phi must be in [0, 1] (0 = no rescale, paper 0.7), got {phi}")
        self.phi = phi

    def combine(self, preds: dict[str, Prediction], ctx: GuideContext):
        guided, state = self.inner.combine(preds, ctx)
        y, y_c = guided.read(self.space), self.read(preds, "cond")
        dims = tuple(range(1, y.ndim))
        # Lin et al. 2024, arXiv 2305.08891, sec. 3.4: x_rescaled = x_cfg * std(x_pos) / std(x_cfg),
        # x_final = phi * x_rescaled + (1 - phi) * x_cfg, std per sample.
        std, std_c = y.std(dim=dims, keepdim=True), y_c.std(dim=dims, keepdim=True)
        rescaled = y * torch.where(std > 0, std_c / std, torch.ones_like(std))  # a constant y (zero-init) stays
        out = self.build(self.phi * rescaled + (1 - self.phi) * y, guided)
        if self.inner.overrides_eps:  # keep the inner rule's re-noising eps (e.g. CFG++'s eps_u)
            out = out.with_eps(guided.eps)
        return out, state
