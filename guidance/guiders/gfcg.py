"""Gradient-free classifier guidance (GFCG, Shenoy et al. 2024): a clean-image classifier, in inference
mode, picks a reference class to guide away from and how strongly."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from guidance.guiders.base import Branch, GuideContext, Guider, bcast
from guidance.parameterization import Prediction


class GFCG(Guider):
    """GFCG: D = D_c + w_r (D_c - D_{c_r}), with c_r and w_r chosen per sample and per step.

    classifier: callable(x0 [B, C, H, W]) -> logits [B, K] on clean images, run under torch.no_grad on D_c.
    Reference class: c_r = the most probable class other than the target c.
    Scale: w_r = (w - 1) * min(1, p(c_r | D_c) / p(c | D_c)): the call's w - 1 is the largest reference scale,
    reached when the classifier finds the denoised sample at least as likely to be c_r as c, and the
    guidance fades as the target class dominates (time-adaptive through D_c). w = 1 is D_c.
    This ratio is our reading of the paper's adaptive scale (its exact schedule could not be checked here).
    space: affine rule, every space gives the same D.
    Predictions [B, C, H, W], w [B]; conditions must be class labels [B].
    Branches: cond; the reference branch (condition c_r, unknown until D_c exists) runs inside `combine`
    through ctx.extras["guided"].run_branches and counts one more NFE.
    """

    name = "gfcg"

    def __init__(self, classifier: Callable[[Tensor], Tensor], space: str = "x0"):
        super().__init__(space)
        if not callable(classifier):
            raise ValueError("gfcg: give a callable classifier(x0) -> logits [B, K] (a clean-image classifier)")
        self.classifier = classifier

    def branches(self, state=None):
        return [Branch("cond", "cond")]

    @torch.no_grad()
    def reference(self, x0: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(c_r [B] long, confusion ratio [B] in [0, 1]) from the classifier on x0 [B, C, H, W]."""
        probs = torch.softmax(self.classifier(x0).to(torch.float64), dim=-1)
        labels = labels.long().reshape(-1, 1)
        p_c = probs.gather(1, labels).squeeze(1)
        others = probs.scatter(1, labels, -1.0)
        p_r, c_r = others.max(dim=1)
        # Shenoy et al. 2024, arXiv 2411.15393 (reference class and adaptive scale; the ratio is our reading):
        # c_r = argmax_{k != c} p(k | D_c), ratio = min(1, p(c_r | D_c) / p(c | D_c))
        ratio = torch.clamp(p_r / p_c.clamp_min(torch.finfo(p_c.dtype).tiny), max=1.0)
        return c_r, ratio

    def combine(self, preds: dict[str, Prediction], ctx: GuideContext):
        cond = preds["cond"]
        c_r, ratio = self.reference(cond.x0, ctx.cond)
        guided = ctx.extras.get("guided")
        if guided is None:
            raise ValueError("gfcg: combine needs ctx.extras['guided'] (a GuidedDenoiser) to run the reference branch")
        ref = guided.run_branches([Branch("ref", "cond")], ctx.x_t, ctx.t, c_r.to(ctx.cond.dtype))["ref"]
        y_c, y_r = cond.read(self.space), ref.read(self.space)
        w_r = (ctx.scale(y_c) - 1) * bcast(ratio, y_c)
        # ibid., GFCG update: D = D_c + w_r (D_c - D_{c_r})
        return self.build(y_c + w_r * (y_c - y_r), cond), ctx.state
