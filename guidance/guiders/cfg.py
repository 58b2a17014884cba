"""Classifier-free guidance and the plain conditional rule.

Convention (used everywhere in this project): D = D_u + w * (D_c - D_u), so w = 1 is the conditional
prediction, w = 0 the unconditional one and w = -eta the ESD erasure target. The original paper
(Ho & Salimans 2022, arXiv 2207.12598, Eq. 6) writes D = D_c + w' * (D_c - D_u) with w' = w - 1;
pass convention="original" to give scales in that form (LCM-style training scripts use it).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from guidance.guiders.base import Branch, GuideContext, Guider, bcast
from guidance.parameterization import Prediction

CONVENTIONS = ("ours", "original")


def to_our_scale(w: Tensor | float, convention: str) -> Tensor | float:
    """Convert a scale given in `convention` to this project's w (D_u + w * Delta)."""
    if convention == "ours":
        return w
    if convention == "original":
        return w + 1
    raise ValueError(f"unknown CFG convention {convention!r}; choose 'ours' (D_u + w*Delta) or 'original' (D_c + w*Delta)")


class Conditional(Guider):
    """No guidance: the conditional branch alone (one network evaluation)."""

    name = "conditional"

    def branches(self, state=None):
        return [Branch("cond", "cond")]

    def combine(self, preds, ctx):
        return preds["cond"], ctx.state


class CFG(Guider):
    """Classifier-free guidance, D = D_u + w (D_c - D_u) (Ho & Salimans 2022, Eq. 6).

    convention: "ours" (w = 1 conditional) or "original" (w' = w - 1).
    space:      where the combination happens; CFG is affine, so every space gives the same D.
    The unconditional branch uses the negative condition when the caller gives one.
    """

    name = "cfg"

    def __init__(self, convention: str = "ours", space: str = "x0"):
        super().__init__(space)
        to_our_scale(0.0, convention)  # validates
        self.convention = convention

    def branches(self, state: Any = None):
        return [Branch("cond", "cond"), Branch("uncond", "uncond")]

    def combine(self, preds: dict[str, Prediction], ctx: GuideContext):
        y_c, y_u = self.read(preds, "cond"), self.read(preds, "uncond")
        w = bcast(to_our_scale(ctx.w, self.convention), y_c)
        return self.build(y_u + w * (y_c - y_u), preds["cond"]), ctx.state
