"""CFG++ (Chung et al. 2025): interpolating guidance whose sampler re-noises with the unconditional eps."""
from __future__ import annotations

from guidance.guiders.base import Branch, GuideContext, Guider, bcast
from guidance.parameterization import Prediction


class CFGPlusPlus(Guider):
    """CFG++: D = D_u + lambda (D_c - D_u), and the returned Prediction carries eps = eps_u.

    lam:   fixed lambda in [0, 1]; None takes lambda from the per-sample scale w of the call (then it is
           the caller's job to keep w in [0, 1]; values outside extrapolate as plain CFG would).
    space: CFG++ is affine, so D is the same in every space; eps_u is always the unconditional branch's.
    DDIM then gives x' = alpha' D + sigma' eps_u and Euler dx = (alpha'_t D + sigma'_t eps_u) dt, which
    is CFG++ (samplers read Prediction.eps). Predictions [B, C, H, W], w [B]. Branches: cond, uncond (batched).
    """

    name = "cfg_pp"
    overrides_eps = True

    def __init__(self, lam: float | None = None, space: str = "x0"):
        super().__init__(space)
        if lam is not None and not 0.0 <= lam <= 1.0:
            raise ValueError(f"cfg_pp: lam must be in [0, 1] (CFG++ interpolates; the paper uses 0.2-0.8), got {lam}")
        self.lam = lam

    def branches(self, state=None):
        return [Branch("cond", "cond"), Branch("uncond", "uncond")]

    def combine(self, preds: dict[str, Prediction], ctx: GuideContext):
        y_c, y_u = self.read(preds, "cond"), self.read(preds, "uncond")
        lam = ctx.scale(y_c) if self.lam is None else bcast(self.lam, y_c)
        # Chung et al. 2025, arXiv 2406.08070, Algorithm 1 (DDIM with CFG++):
        # x0_hat = x0_u + lambda (x0_c - x0_u); x_{t-1} = sqrt(a_{t-1}) x0_hat + sqrt(1 - a_{t-1}) eps_u
        out = self.build(y_u + lam * (y_c - y_u), preds["cond"])
        return out.with_eps(preds["uncond"].eps), ctx.state
