"""The guided denoiser: runs a guider's branches (batching those that can share a forward) and
combines them; plus `teacher_target`, the stateless entry point distillation and erasure call."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn

from guidance.conditions import cond_cat, cond_split
from guidance.denoiser import Denoiser
from guidance.guiders.base import Branch, GuideContext, Guider
from guidance.parameterization import Prediction
from guidance.schedules import _bcast


class GuidedDenoiser(nn.Module):
    """Guided D(x_t, t, cond, w) = guider.combine(branch predictions).

    denoiser: the main network's Denoiser; weak: a second Denoiser for autoguidance (same schedule).
    Branches on the same network with no perturbation run as ONE batched forward (the batch grows
    by the number of branches); perturbed branches run one by one. `nfe` counts network evaluations
    per sample since the last `reset_nfe()`.
    """

    def __init__(self, denoiser: Denoiser, guider: Guider, weak: Denoiser | None = None, batch_branches: bool = True):
        super().__init__()
        self.denoiser = denoiser
        self.guider = guider
        self.weak = weak
        self.batch_branches = batch_branches
        self.nfe = 0
        needs_weak = any(b.model == "weak" for b in guider.branches(None))
        if needs_weak and weak is None:
            raise ValueError(f"guider {guider.name!r} needs a weak model: give `weak` (a smaller or less-trained network)")

    @property
    def schedule(self):
        return self.denoiser.schedule

    def reset_nfe(self) -> None:
        self.nfe = 0

    def _resolve_cond(self, branch: Branch, cond: Any, neg_cond: Any) -> Any:
        if branch.cond == "cond":
            return cond
        if branch.cond == "null":
            return self.denoiser.null_cond(cond)
        if branch.cond == "uncond":
            return self.denoiser.null_cond(cond) if neg_cond is None else _first_neg(neg_cond)
        if branch.cond.startswith("neg:"):
            if neg_cond is None:
                raise ValueError(f"guider {self.guider.name!r} needs negative conditions (neg_cond) for branch {branch.name!r}")
            negs = neg_cond if isinstance(neg_cond, (list, tuple)) else [neg_cond]
            i = int(branch.cond.split(":")[1])
            if i >= len(negs):
                raise ValueError(f"branch {branch.name!r} asks for negative #{i} but only {len(negs)} were given")
            return negs[i]
        raise ValueError(f"unknown branch condition {branch.cond!r} in guider {self.guider.name!r}")

    def _model(self, branch: Branch) -> Denoiser:
        return self.denoiser if branch.model == "main" else self.weak

    def run_branches(self, branches: list[Branch], x_t: Tensor, t: Tensor, cond: Any, neg_cond: Any = None) -> dict[str, Prediction]:
        """Evaluate `branches` at (x_t, t); returns {branch name: Prediction}."""
        preds: dict[str, Prediction] = {}
        groups: dict[str, list[Branch]] = defaultdict(list)
        for b in branches:
            if b.perturb is None and self.batch_branches:
                groups[b.model].append(b)
            else:
                preds[b.name] = self._model(b)(x_t, t, self._resolve_cond(b, cond, neg_cond), **_perturb_kwargs(b))
        for model, group in groups.items():
            den = self._model(group[0])
            if len(group) == 1:
                preds[group[0].name] = den(x_t, t, self._resolve_cond(group[0], cond, neg_cond))
                continue
            n = x_t.shape[0]
            conds = [self._resolve_cond(b, cond, neg_cond) for b in group]
            out = den(torch.cat([x_t] * len(group)), torch.cat([t] * len(group)), cond_cat(conds))
            for i, b in enumerate(group):
                sl = slice(i * n, (i + 1) * n)
                preds[b.name] = Prediction(x_t=out.x_t[sl], alpha=out.alpha[sl], sigma=out.sigma[sl], x0=out.x0[sl], eps=out.eps[sl])
        self.nfe += len(branches)
        return preds

    def guide(self, x_t: Tensor, t: Tensor, cond: Any, w: Tensor | float, neg_cond: Any = None,
              state: Any = None) -> tuple[Prediction, Any]:
        """One guided prediction. x_t [B, C, H, W]; t [B] or scalar; w [B] or scalar (this project's
        CFG convention). Returns (Prediction, new guider state)."""
        b = x_t.shape[0]
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(b) if torch.as_tensor(t).ndim == 0 else t
        dtype = torch.promote_types(x_t.dtype, torch.float32)  # float64 stays float64
        w = torch.as_tensor(w, dtype=dtype, device=x_t.device)
        w = w.expand(b) if w.ndim == 0 else w
        a, s = self.schedule.alpha_sigma(_bcast(t, x_t.to(dtype)))
        # gates written in t or sigma (guidance interval, adaptive) may ask for fewer branches at this time
        preds = self.run_branches(self.guider.branches_at(state, t, a, s), x_t, t, cond, neg_cond)
        ctx = GuideContext(x_t=x_t, t=t, alpha=a, sigma=s, w=w, cond=cond, state=state,
                           extras={"guided": self, "neg_cond": neg_cond})
        return self.guider.combine(preds, ctx)

    def forward(self, x_t: Tensor, t: Tensor, cond: Any, w: Tensor | float, neg_cond: Any = None) -> Prediction:
        """Stateless guided prediction (no per-trajectory state)."""
        return self.guide(x_t, t, cond, w, neg_cond, None)[0]


def _first_neg(neg_cond: Any) -> Any:
    return neg_cond[0] if isinstance(neg_cond, (list, tuple)) else neg_cond


def _perturb_kwargs(branch: Branch) -> dict:
    return {} if branch.perturb is None else {"perturb": branch.perturb}


@torch.no_grad()
def teacher_target(guided: GuidedDenoiser, x_t: Tensor, t: Tensor, cond: Any, w: Tensor | float,
                   space: str = "x0", neg_cond: Any = None) -> Tensor:
    """The guided teacher's prediction in `space` (eps, x0, v, flow), with no grad and no state.

    Distillation (random t, random per-sample w) and erasure (w = -eta) targets both come from here.
    x_t [B, C, H, W]; t [B]; w [B] or scalar. Returns [B, C, H, W] in x_t's dtype promoted to float32.
    """
    return guided(x_t, t, cond, w, neg_cond).read(space)
