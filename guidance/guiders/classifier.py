"""Classifier guidance (Dhariwal & Nichol 2021): add a noisy classifier's gradient to the denoiser."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from guidance.guiders.base import Branch, GuideContext, Guider
from guidance.parameterization import Prediction

Classifier = Callable[[Tensor, Tensor, Tensor], Tensor]


class ClassifierGuidance(Guider):
    """Classifier guidance: D = D_base + s sigma^2 / alpha * grad_x log p(y | x_t).

    classifier: callable(x_t [B, C, H, W], t [B] in [0, 1], labels [B]) -> logits [B, K], trained on
                noisy inputs; differentiated w.r.t. a detached copy of x_t under torch.enable_grad (the
                denoiser branches are not differentiated). Labels are the call's `cond`.
    base:       "cond" (guide the conditional model, as ADM's best results) or "null" (the unconditional one).
    Scale: s = w - 1 on the conditional model and s = w on the unconditional one, so that with an exact
    classifier both equal CFG with the same w (w = 1: the conditional distribution). The classifier's
    forward and backward are not counted as network evaluations.

    Derivation of the x0-space factor: Dhariwal & Nichol (arXiv 2105.05233, Algorithm 2, with their
    gradient scale s) guide eps as eps_hat = eps - s sigma grad log p(y|x_t), sigma = sqrt(1 - alpha_bar).
    With x0 = (x_t - sigma eps) / alpha this is x0_hat = x0 + s sigma^2 / alpha grad log p(y|x_t), the
    Tweedie form D = (x_t + sigma^2 grad log p_t(x_t)) / alpha with the classifier's score added.
    """

    name = "classifier"

    def __init__(self, classifier: Classifier, base: str = "cond"):
        super().__init__("x0")
        if not callable(classifier):
            raise ValueError("classifier: give a callable classifier(x_t, t, labels) -> logits [B, K]")
        if base not in ("cond", "null"):
            raise ValueError(f"classifier: base must be 'cond' (conditional model) or 'null' (unconditional), got {base!r}")
        self.classifier, self.base = classifier, base

    def branches(self, state=None):
        return [Branch("base", self.base)]

    def grad_log_prob(self, x_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """grad_x log p(labels | x) at x = x_t [B, C, H, W] (per sample; the sum over the batch has a
        block-diagonal Jacobian)."""
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            logp = torch.log_softmax(self.classifier(x, t, labels), dim=-1)
            picked = logp.gather(1, labels.long().reshape(-1, 1)).sum()
            return torch.autograd.grad(picked, x)[0]

    def combine(self, preds: dict[str, Prediction], ctx: GuideContext):
        base = preds["base"]
        s = ctx.scale(base.x0) - (1 if self.base == "cond" else 0)
        grad = self.grad_log_prob(base.x_t, ctx.t, ctx.cond).to(base.x0.dtype)
        # Dhariwal & Nichol 2021, Algorithm 2 in x0 form (see class docstring): D = D + s sigma^2 / alpha grad log p(y|x_t)
        x0 = base.x0 + s * base.sigma**2 / base.alpha * grad
        return Prediction.from_x0(x0, base.x_t, base.alpha, base.sigma), ctx.state
