"""Perturbed-attention guidance (Ahn et al. 2024) combined with CFG."""
from __future__ import annotations

from guidance.guiders.base import Branch, GuideContext, Guider
from guidance.parameterization import Prediction


class PAG(Guider):
    """PAG + CFG: D = D_u + w (D_c - D_u) + s (D_c - D_ptb).

    pag_scale: s >= 0 (the paper uses 3.0 alone, smaller with CFG); w is the call's CFG scale.
    space:     affine rule (weights sum to 1), every space gives the same D.
    Branches: cond and uncond (batched), and "ptb": the conditional pass with the network's selected
    self-attention maps replaced by identity; the network receives `perturb="pag"` and must implement
    it (run alone, never batched; every adapter does, through models.pag_attention: a UNet's mid-block
    self-attention (class and text UNets), SD3 / Flux joint attention with the image-image block of the map
    made the identity).
    Predictions [B, C, H, W], w [B].
    """

    name = "pag"

    def __init__(self, pag_scale: float = 3.0, space: str = "x0"):
        super().__init__(space)
        if not pag_scale >= 0:
            raise ValueError(f"pag: pag_scale must be >= 0 (0 = CFG alone; paper 3.0), got {pag_scale}")
        self.pag_scale = pag_scale

    def branches(self, state=None):
        return [Branch("cond", "cond"), Branch("uncond", "uncond"), Branch("ptb", "cond", perturb="pag")]

    def combine(self, preds: dict[str, Prediction], ctx: GuideContext):
        y_c, y_u, y_p = self.read(preds, "cond"), self.read(preds, "uncond"), self.read(preds, "ptb")
        # Ahn et al. 2024, arXiv 2403.17377 (PAG, eps~ = eps + s (eps - eps_ptb)), added to CFG as in its
        # CFG + PAG experiments: D = D_u + w (D_c - D_u) + s (D_c - D_ptb)
        out = y_u + ctx.scale(y_c) * (y_c - y_u) + self.pag_scale * (y_c - y_p)
        return self.build(out, preds["cond"]), ctx.state
