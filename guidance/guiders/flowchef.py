"""FlowChef-style steering (Patel et al. 2025): move x_t down a loss gradient taken w.r.t. the denoised
prediction only, with no backpropagation through the network."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from guidance.guiders.base import GuideContext, Guider, Wrapper
from guidance.guiders.cfg import Conditional
from guidance.parameterization import Prediction


class FlowChef(Wrapper):
    """FlowChef: x_t <- x_t - s grad_D L(D), the velocity kept, on top of any inner guider.

    loss:       callable(x0 [B, C, H, W]) -> loss [B] or scalar (e.g. a masked reconstruction error for
                inpainting); differentiated w.r.t. a detached D only, under torch.enable_grad.
    step_size:  s > 0.
    iterations: gradient steps per call (each re-evaluates the loss at the moved D, never the network).
    inner:      the guider whose prediction is steered (default: the conditional branch alone).
    Written for rectified flow (alpha + sigma = 1): FlowChef's velocity is unchanged by the step, so the
    moved prediction at x_t' = x_t + delta has D' = D + delta and eps' = eps + delta (delta = -s sum grad).
    The returned Prediction lives at x_t' (its x_t field); DDIM reads only D and eps and lands on
    x_t' + dt v. On other schedules x_t' = x_t + (alpha + sigma) delta keeps it self-consistent.
    Samplers that continue from their own x (Euler, DPM-Solver++) must use pred.x_t to see the step.
    """

    name = "flowchef"
    needs_cond = False

    def __init__(self, loss: Callable[[Tensor], Tensor], step_size: float = 0.5, iterations: int = 1,
                 inner: Guider | None = None):
        super().__init__(Conditional() if inner is None else inner, "x0")
        if not callable(loss):
            raise ValueError("flowchef: give a callable loss(x0) -> [B] or scalar")
        if not step_size > 0:
            raise ValueError(f"flowchef: step_size must be > 0, got {step_size}")
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"flowchef: iterations must be an integer >= 1, got {iterations!r}")
        self.loss, self.step_size, self.iterations = loss, step_size, iterations

    def loss_grad(self, x0: Tensor) -> Tensor:
        """grad_{x0} sum(loss(x0)) for x0 [B, C, H, W], detached from everything upstream."""
        with torch.enable_grad():
            x = x0.detach().requires_grad_(True)
            return torch.autograd.grad(self.loss(x).sum(), x)[0]

    def combine(self, preds: dict[str, Prediction], ctx: GuideContext):
        pred, state = self.inner.combine(preds, ctx)
        x0 = pred.x0.detach()
        moved = x0
        for _ in range(self.iterations):
            # Patel et al. 2025, arXiv 2412.00100, Algorithm 1 (gradient skipping): x_t <- x_t - s grad_{x0_hat} L(x0_hat),
            # with d x0_hat / d x_t taken as the identity (velocity fixed)
            moved = moved - self.step_size * self.loss_grad(moved)
        delta = moved - x0
        return Prediction(x_t=pred.x_t + (pred.alpha + pred.sigma) * delta, alpha=pred.alpha, sigma=pred.sigma,
                          x0=pred.x0 + delta, eps=pred.eps + delta), state
