"""Guidance interval (Kynkaanniemi et al. 2024): apply an inner guider only in a band of noise levels."""
from __future__ import annotations

import torch
from torch import Tensor

from guidance.guiders.base import Branch, GuideContext, Guider, Wrapper, bcast
from guidance.guiders.cfg import CFG
from guidance.parameterization import Prediction


class Interval(Wrapper):
    """Guidance interval: the inner guider's D where the gate is open, D_c elsewhere (per sample).

    sigma_lo, sigma_hi: gate open for sigma/alpha in (sigma_lo, sigma_hi] (EDM's noise level, equal to the
                        schedule's sigma when alpha = 1, so the paper's values transfer to VP and flow
                        schedules). Or give
    t_lo, t_hi:         gate open for t in (t_lo, t_hi] (t in [0, 1], t = 1 pure noise). Exactly one pair.
    inner:              the guider applied inside the interval (default CFG); needs a "cond" branch.
    Predictions [B, C, H, W]; the gate is per sample (t [B]), and the selection covers x_t, x0 and eps.

    NFE: `combine` selects per sample with torch.where, so inside `combine` every branch has already run.
    `branches_at(state, t, alpha, sigma)` returns only the conditional branch when the whole batch is
    outside the interval; GuidedDenoiser saves those evaluations once it asks `branches_at` instead of
    `branches` (proposed hook). Inner state is left unchanged at calls where the whole batch is outside and
    advances for every sample at calls where the gate is open for some (samplers share t across the batch).
    """

    name = "interval"

    def __init__(self, sigma_lo: float | None = None, sigma_hi: float | None = None, t_lo: float | None = None,
                 t_hi: float | None = None, inner: Guider | None = None):
        super().__init__(CFG() if inner is None else inner, "x0")
        by_sigma = sigma_lo is not None or sigma_hi is not None
        by_t = t_lo is not None or t_hi is not None
        if by_sigma == by_t:
            raise ValueError("interval: give exactly one gate, either sigma_lo and sigma_hi (noise level) or t_lo and t_hi")
        lo, hi = (sigma_lo, sigma_hi) if by_sigma else (t_lo, t_hi)
        which = "sigma" if by_sigma else "t"
        if lo is None or hi is None:
            raise ValueError(f"interval: give both {which}_lo and {which}_hi")
        if lo < 0 or not lo < hi:
            raise ValueError(f"interval: need 0 <= {which}_lo < {which}_hi (gate is ({which}_lo, {which}_hi]), "
                             f"got {which}_lo={lo}, {which}_hi={hi}; swap them if reversed")
        if by_t and hi > 1:
            raise ValueError(f"interval: t_hi must be <= 1 (t runs over [0, 1]), got {hi}")
        self.sigma_lo, self.sigma_hi, self.t_lo, self.t_hi = sigma_lo, sigma_hi, t_lo, t_hi

    def gate(self, t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """Bool [B]: True where guidance applies. t [B]; alpha, sigma [B, 1, ...] or [B]."""
        if self.t_lo is not None:
            # Kynkaanniemi et al. 2024, arXiv 2404.07724 (guidance interval), the gate written in t: t in (lo, hi]
            return (t > self.t_lo) & (t <= self.t_hi)
        level = (sigma / alpha).reshape(sigma.shape[0] if sigma.ndim else 1)
        # ibid., guided denoiser: D = D_guided if sigma in (sigma_lo, sigma_hi], else D_c
        return (level > self.sigma_lo) & (level <= self.sigma_hi)

    def branches_at(self, state, t, alpha, sigma):
        if not bool(self.gate(t, alpha, sigma).any()):
            return [Branch("cond", "cond")]
        return super().branches_at(state, t, alpha, sigma)

    def combine(self, preds: dict[str, Prediction], ctx: GuideContext):
        cond = preds["cond"]
        needed = {b.name for b in self.branches(ctx.state)}
        if not needed <= preds.keys():  # branches_at skipped the inner branches: whole batch outside
            return cond, ctx.state
        open_ = self.gate(ctx.t, cond.alpha, cond.sigma).to(cond.x0.device)  # the branch's alpha, sigma: full precision
        if not bool(open_.any()):
            return cond, ctx.state
        guided, state = self.inner.combine(preds, ctx)
        if bool(open_.all()):
            return guided, state
        m = bcast(open_, cond.x0).bool()
        pick = lambda a, b: torch.where(m, a, b)  # noqa: E731
        return Prediction(x_t=pick(guided.x_t, cond.x_t), alpha=cond.alpha, sigma=cond.sigma,
                          x0=pick(guided.x0, cond.x0), eps=pick(guided.eps, cond.eps)), state
