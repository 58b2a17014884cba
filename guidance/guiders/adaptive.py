"""Adaptive guidance (Castillo et al. 2025): CFG until the conditional and unconditional predictions
align, then the conditional branch alone for the rest of the trajectory (fewer network evaluations)."""
from __future__ import annotations

import torch

from guidance.guiders.base import Branch, GuideContext, Guider, bcast, flat_dot
from guidance.guiders.cfg import to_our_scale
from guidance.parameterization import Prediction


class AdaptiveGuidance(Guider):
    """Adaptive guidance: CFG, D = D_u + w (D_c - D_u), until cos(eps_c, eps_u) > gamma; D_c afterwards.

    gamma:      cosine threshold in (0, 1) (the paper's gamma-bar, close to 1, e.g. 0.99).
    min_steps:  calls of a trajectory before the cosine is tested. Where the first step has alpha ~ 0
                (rectified flow at t = 1) eps_c = eps_u = x_t / sigma there, so the cosine is 1 and the
                rule would stop guiding at once; the default 1 skips that step.
    convention: CFG scale convention of w ("ours" or "original", see guidance.guiders.cfg).
    space:      where the CFG part is combined (affine: every space gives the same D).
    test_space: where the cosine is measured: "eps" as in the paper; "x0" for pixel-space VP models, where
                cos(eps_c, eps_u) stays above 0.995 along the whole trajectory (eps ~ x_t/sigma dominates)
                while cos(D_c, D_u) rises monotonically from ~0.88 to 1 (measured on the digits teacher).
    Predictions [B, C, H, W], w [B].
    Decision per sample, saving per batch: each sample latches off the first time its cosine (over all
    non-batch dims, in eps space as in the paper) exceeds gamma; that call still returns CFG (both
    branches are already paid for), later calls return D_c for it. Once every sample in the batch has
    latched, `branches` asks for [cond] only and the network evaluations per step halve. With batch
    size 1 this is exactly the paper's per-trajectory rule.
    State: {"off": bool [B], "step": int} (init_state: all False, 0); without a state every call is
    plain CFG.
    """

    name = "adaptive"
    stateful = True

    def __init__(self, gamma: float = 0.99, min_steps: int = 1, convention: str = "ours", space: str = "x0",
                 test_space: str = "eps"):
        super().__init__(space)
        if test_space not in ("eps", "x0", "v", "flow"):
            raise ValueError(f"adaptive: test_space must be eps, x0, v or flow, got {test_space!r}")
        self.test_space = test_space
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"adaptive: gamma is a cosine threshold and must be in (0, 1) (paper: close to 1, "
                             f"e.g. 0.99), got {gamma}")
        if not isinstance(min_steps, int) or min_steps < 0:
            raise ValueError(f"adaptive: min_steps must be an integer >= 0, got {min_steps!r}")
        to_our_scale(0.0, convention)
        self.gamma, self.min_steps, self.convention = gamma, min_steps, convention

    def init_state(self, batch_size: int) -> dict:
        return {"off": torch.zeros(batch_size, dtype=torch.bool), "step": 0}

    def branches(self, state=None):
        if state is not None and bool(state["off"].all()):
            return [Branch("cond", "cond")]
        return [Branch("cond", "cond"), Branch("uncond", "uncond")]

    def combine(self, preds: dict[str, Prediction], ctx: GuideContext):
        cond = preds["cond"]
        if "uncond" not in preds:  # every sample latched: conditional only
            return cond, (None if ctx.state is None else {**ctx.state, "step": ctx.state["step"] + 1})
        y_c, y_u = self.read(preds, "cond"), self.read(preds, "uncond")
        w = bcast(to_our_scale(ctx.w, self.convention), y_c)
        guided = self.build(y_u + w * (y_c - y_u), cond)
        if ctx.state is None:
            return guided, None
        e_c, e_u = cond.read(self.test_space), preds["uncond"].read(self.test_space)
        # Castillo et al. 2025, arXiv 2312.12487 (adaptive guidance policy): gamma_t = cos(eps_c, eps_u); truncate CFG
        # once gamma_t > gamma-bar
        cos = (flat_dot(e_c, e_u) / (flat_dot(e_c, e_c) * flat_dot(e_u, e_u)).sqrt()).reshape(-1)
        was_off = ctx.state["off"].to(cos.device)
        if bool(was_off.any()):
            m = bcast(was_off, y_c).bool()
            guided = Prediction(x_t=cond.x_t, alpha=cond.alpha, sigma=cond.sigma,
                                x0=torch.where(m, cond.x0, guided.x0), eps=torch.where(m, cond.eps, guided.eps))
        passed = (cos > self.gamma) & (ctx.state["step"] >= self.min_steps)
        return guided, {"off": was_off | passed, "step": ctx.state["step"] + 1}
