"""Perp-Neg (Armandpour et al. 2023): several negative conditions, each contributing only its
component perpendicular to the positive guidance direction."""
from __future__ import annotations

from typing import Sequence

import torch

from guidance.guiders.base import Branch, GuideContext, Guider, flat_dot
from guidance.parameterization import Prediction


class PerpNeg(Guider):
    """Perp-Neg: D = D_null + w [Delta_pos - sum_i w_i Delta_i_perp].

    Delta_pos = D_c - D_null, Delta_i = D_neg_i - D_null, Delta_i_perp = Delta_i minus its projection
    on Delta_pos (per sample, over all non-batch dims).
    neg_weights: one weight w_i >= 0 per negative condition; the caller passes the negatives as a list
                 `neg_cond=[c_0, c_1, ...]` (branches "neg:i"), the null condition is the network's own.
    space:       where the rule is applied. Every term is a difference of predictions, so a change of
                 space scales all of them by the same per-sample factor and the result is the same
                 in every space (eps is the paper's).
    Predictions [B, C, H, W], w [B]. Branches: cond, null, neg:0 .. neg:n-1 (all batched into one forward).
    """

    name = "perp_neg"

    def __init__(self, neg_weights: Sequence[float] = (1.0,), space: str = "eps"):
        super().__init__(space)
        weights = [float(x) for x in neg_weights]
        if not weights:
            raise ValueError("perp_neg: neg_weights must list one weight per negative condition, got none")
        if any(x < 0 for x in weights):
            raise ValueError(f"perp_neg: neg_weights must be >= 0 (a negative weight would pull toward the "
                             f"negative), got {weights}")
        self.neg_weights = weights

    def branches(self, state=None):
        return [Branch("cond", "cond"), Branch("null", "null")] + [
            Branch(f"neg:{i}", f"neg:{i}") for i in range(len(self.neg_weights))]

    def combine(self, preds: dict[str, Prediction], ctx: GuideContext):
        y_c, y_0 = self.read(preds, "cond"), self.read(preds, "null")
        pos = y_c - y_0
        pos_sq = flat_dot(pos, pos).clamp_min(torch.finfo(pos.dtype).tiny)
        step = pos
        for i, w_i in enumerate(self.neg_weights):
            neg = self.read(preds, f"neg:{i}") - y_0
            # Armandpour et al. 2023, arXiv 2304.04968, Perp-Neg (perpendicular gradient):
            # e_i_perp = e_i - <e_i, e_pos> / ||e_pos||^2 e_pos
            perp = neg - flat_dot(neg, pos) / pos_sq * pos
            step = step - w_i * perp
        # ibid., Perp-Neg update: e = e_null + w (e_pos - sum_i w_i e_i_perp)
        return self.build(y_0 + ctx.scale(y_c) * step, preds["cond"]), ctx.state
