"""Adaptive projected guidance (Sadat et al. 2025): CFG's update with reverse momentum, norm clipping
and the component parallel to D_c down-weighted."""
from __future__ import annotations

import math

import torch

from guidance.guiders.base import Branch, GuideContext, Guider, bcast, flat_dot
from guidance.parameterization import Prediction


class APG(Guider):
    """APG in D (x0) space: D = D_c + (w - 1) (Delta_perp + eta Delta_par).

    beta:  momentum in (-1, 1); the paper uses reverse momentum (beta < 0, e.g. -0.5); 0 disables it.
    r:     norm threshold > 0 on the (momentum-averaged) Delta, per sample; None disables clipping.
    eta:   weight in [0, 1] of the component of Delta parallel to D_c (paper: 0; 1 = CFG with
           momentum and clipping).
    space: the paper's is x0 (D); others are allowed but give other results (clipping and the
           projection on D_c are not affine).
    State (explicit, per trajectory): {"avg": running average of Delta}; `init_state` gives zeros [B],
    `combine` returns the new average (Delta + beta * avg). Without a state (teacher targets) the
    average starts from zero at every call. Tensors [B, C, H, W]; norms over all non-batch dims.
    Branches: cond, uncond (batched).
    """

    name = "apg"
    stateful = True

    def __init__(self, beta: float = -0.5, r: float | None = 15.0, eta: float = 0.0, space: str = "x0"):
        super().__init__(space)
        if not -1.0 < beta < 1.0:
            raise ValueError(f"apg: momentum beta must be in (-1, 1) so the running average stays bounded "
                             f"(the paper uses negative values such as -0.5), got {beta}")
        if r is not None and not (r > 0 and math.isfinite(r)):
            raise ValueError(f"apg: norm threshold r must be a positive number (or None to disable clipping), got {r}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"apg: eta must be in [0, 1] (0 drops the parallel component as in the paper, "
                             f"1 keeps it), got {eta}")
        self.beta, self.r, self.eta = beta, r, eta

    def branches(self, state=None):
        return [Branch("cond", "cond"), Branch("uncond", "uncond")]

    def init_state(self, batch_size: int) -> dict:
        return {"avg": torch.zeros(batch_size)}

    def combine(self, preds: dict[str, Prediction], ctx: GuideContext):
        y_c, y_u = self.read(preds, "cond"), self.read(preds, "uncond")
        delta = y_c - y_u
        prev = None if ctx.state is None else ctx.state["avg"]
        if prev is not None:
            prev = bcast(prev, delta) if prev.ndim == 1 else prev.to(delta)
            # Sadat et al. 2025, arXiv 2410.02416, Algorithm 1 (reverse momentum): Delta_t <- Delta_t + beta Delta_{t-1}
            delta = delta + self.beta * prev
        new_state = {"avg": delta}
        update = delta
        if self.r is not None:
            # ibid., Algorithm 1 (norm rescaling): Delta <- Delta * min(1, r / ||Delta||)
            norm = flat_dot(update, update).sqrt()
            update = update * torch.clamp(self.r / norm, max=1.0)
        # ibid., Algorithm 1 (projection on D_c): Delta_par = <Delta, D_c> / ||D_c||^2 D_c, Delta_perp = Delta - Delta_par
        c_sq = flat_dot(y_c, y_c).clamp_min(torch.finfo(y_c.dtype).tiny)
        par = flat_dot(update, y_c) / c_sq * y_c
        perp = update - par
        # ibid., Algorithm 1: D = D_c + (w - 1) (Delta_perp + eta Delta_par)
        out = y_c + (ctx.scale(y_c) - 1) * (perp + self.eta * par)
        return self.build(out, preds["cond"]), (new_state if ctx.state is not None else None)
