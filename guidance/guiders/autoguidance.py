"""Autoguidance (Karras et al. 2024): guide a model with a weaker version of itself."""
from __future__ import annotations

from guidance.guiders.base import Branch, GuideContext, Guider
from guidance.parameterization import Prediction


class Autoguidance(Guider):
    """Autoguidance: D = D_weak + w (D_main - D_weak), both with the positive condition.

    space: affine rule, every space gives the same D.
    Branches: "cond" on the main model and "weak" (same condition) on the weak model, a smaller or
    less-trained network given to GuidedDenoiser(weak=...). w = 1 is the main model alone.
    Predictions [B, C, H, W], w [B].
    """

    name = "autoguidance"

    def branches(self, state=None):
        return [Branch("cond", "cond", "main"), Branch("weak", "cond", "weak")]

    def combine(self, preds: dict[str, Prediction], ctx: GuideContext):
        y_main, y_weak = self.read(preds, "cond"), self.read(preds, "weak")
        # Karras et al. 2024, arXiv 2406.02507 (autoguidance, CFG's form with D_0 the weak model):
        # D_w = w D_1 + (1 - w) D_0 = D_0 + w (D_1 - D_0)
        return self.build(y_weak + ctx.scale(y_main) * (y_main - y_weak), preds["cond"]), ctx.state
