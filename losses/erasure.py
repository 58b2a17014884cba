"""Concept-erasure targets and preservation terms, all read off the FROZEN model through the guidance core.

Every target here is `guidance.guided.teacher_target` (no grad) on a GuidedDenoiser built around the frozen
Denoiser, so erasure uses exactly the guidance rule samplers use. Convention (guidance.guiders.cfg):
D = D_u + w (D_c - D_u); w = 1 is the conditional prediction, w = 0 the unconditional one.

Shapes: x_t [B, C, H, W]; t [B] in [0, 1]; conditions [B] labels (-1 = null) or whatever the network takes.
Targets come back in `space` (eps, x0, v, flow): [B, C, H, W], float32 or wider. The student regresses them
with `regression_loss` on its own prediction read in the same space.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from guidance.conditions import cond_index
from guidance.denoiser import Denoiser
from guidance.guided import GuidedDenoiser, teacher_target
from guidance.guiders import CFG, Conditional, Guider


def _guided(frozen: Denoiser, guider: Guider | None) -> GuidedDenoiser:
    return GuidedDenoiser(frozen, CFG() if guider is None else guider)


def esd_target(frozen: Denoiser, x_t: Tensor, t: Tensor, cond: Any, eta: float | Tensor = 1.0,
               space: str = "eps", guider: Guider | None = None) -> Tensor:
    """ESD target (Gandikota et al. 2023, arXiv 2303.07345, Eq. 6):
    eps* = eps(x_t, null) - eta (eps(x_t, c) - eps(x_t, null)), i.e. the frozen model guided at w = -eta.

    frozen: the frozen model's Denoiser; cond: the erased condition [B]; eta: scalar or per-sample [B];
    guider: the rule applied at w = -eta (default CFG in this project's convention; an affine rule gives the
    same target in every space, so reading it in eps reproduces the paper's eps-space formula).
    Returns [B, C, H, W] in `space`.
    """
    return teacher_target(_guided(frozen, guider), x_t, t, cond, -eta, space)


def ant_early_target(frozen: Denoiser, x_t: Tensor, t: Tensor, cond: Any, eta: float | Tensor = 1.0,
                     space: str = "eps", guider: Guider | None = None) -> Tensor:
    """ANT's early-stage target ("Set You Straight", Li et al. 2025, arXiv 2504.12782, sec. 3; the authors' code, its
    loss_1): at the early, high-noise steps the conditional prediction keeps the frozen guidance direction,
    eps* = eps(x_t, null) + eta (eps(x_t, c) - eps(x_t, null)), i.e. the frozen model guided at w = +eta (ESD's Eq. 6
    with the sign of the guidance term flipped). At eta = 1 it is the frozen conditional prediction.

    frozen: the frozen model's Denoiser; cond: the erased condition [B]; eta: scalar or per-sample [B].
    Returns [B, C, H, W] in `space`.
    """
    return teacher_target(_guided(frozen, guider), x_t, t, cond, eta, space)


def window_scale(t: Tensor, eta: float, t_window: float, early_scale: float | None = None) -> Tensor:
    """Per-sample guidance scale [B] of the ANT window ("Set You Straight", Li et al. 2025, arXiv 2504.12782):
    reversed guidance w = -eta at mid-to-late denoising (t <= t_window), w = early_scale at early, high-noise steps
    (t > t_window): None = +eta, ANT's early target e_0 + eta (e_p - e_0) (`ant_early_target`); 1 = the frozen
    conditional prediction (this project's target before ANT's was followed; the same at eta = 1). t: [B] in [0, 1]."""
    early = float(eta) if early_scale is None else float(early_scale)
    return torch.where(t <= t_window, torch.full_like(t, -float(eta)), torch.full_like(t, early))


def ant_target(frozen: Denoiser, x_t: Tensor, t: Tensor, cond: Any, eta: float = 1.0, t_window: float = 0.8,
               space: str = "eps", guider: Guider | None = None, early_scale: float | None = None) -> Tensor:
    """ANT's trajectory-aware target (arXiv 2504.12782, sec. 3) by time: the ESD target inside the window
    t <= t_window, the early-stage target above it (`window_scale`: the frozen model guided at w = +eta, or at
    early_scale), one guided call with per-sample scales. Pair it with `preservation_target` on the null condition to
    keep the unconditional prediction at every stage. Returns [B, C, H, W] in `space`.
    """
    return teacher_target(_guided(frozen, guider), x_t, t, cond, window_scale(t, eta, t_window, early_scale), space)


def toward_target(frozen: Denoiser, x_t: Tensor, t: Tensor, target_cond: Any, w: float | Tensor = 1.0,
                  space: str = "eps", source_cond: Any = None, guider: Guider | None = None) -> Tensor:
    """Erase A toward B: the frozen prediction for B, optionally guided (All but One, Hong et al. 2024,
    arXiv 2312.12807, redirects the guidance term toward a user-chosen alternative concept).

    target_cond: B [B]; w: guidance scale toward B (1: the plain prediction D(x_t, B), one network call);
    source_cond: A [B] or None; when given, A replaces the null condition as the negative, D_A + w (D_B - D_A),
    so w > 1 also pushes away from A (a negative prompt, guidance.guided's "uncond" branch).
    Returns [B, C, H, W] in `space`.
    """
    if guider is None and source_cond is None and isinstance(w, (int, float)) and w == 1:
        return preservation_target(frozen, x_t, t, target_cond, space)
    return teacher_target(_guided(frozen, guider), x_t, t, target_cond, w, space, neg_cond=source_cond)


def windowed(target: Tensor, outside: Tensor, t: Tensor, t_window: float | None) -> Tensor:
    """`target` where t <= t_window, `outside` elsewhere (the ANT window applied to any erasure target, e.g.
    `toward_target` inside, the frozen D(x_t, A) outside). target, outside [B, ...]; t [B]."""
    if t_window is None:
        return target
    inside = (t <= t_window).reshape(-1, *([1] * (target.ndim - 1)))
    return torch.where(inside, target, outside)


def forget_target(guided: GuidedDenoiser, x_t: Tensor, t: Tensor, cond: Any, w: float | Tensor, erased: Tensor,
                  eta: float = 1.0, safe: Any = None, space: str = "x0") -> Tensor:
    """The real-score target of Score Forgetting Distillation (SFD, Chen et al. 2024, arXiv 2409.11219, sec. 3):
    inside a distribution-matching objective, the guided teacher's prediction D_u + w (D_c - D_u) for every
    sample, except the erased ones (a forgotten concept's request), which get another target, so the distilled
    generator learns it for them:

    - `safe` given: SFD's score override, the guided teacher's prediction for the SAFE request at the sample's own
      scale w with the same guider (`toward_target`; the authors' code, tqch/score-forgetting-distillation
      DDPM/functions/losses.py sid_g_loss_conditional, evaluates the teacher at the override label p_c while the
      fake score keeps the forgotten one);
    - `safe` None: ESD's negative-guidance target (`esd_target`: the frozen model guided at w = -eta, CFG).

    guided: the guided teacher (its `denoiser` is the frozen model; a guider needing a weak model cannot build the
    safe target); x_t [B, C, H, W]; t [B]; cond: the condition [B] (class ids or text embeddings); w: scalar or [B];
    erased: bool [B], which samples ask for a forgotten concept (the caller matches requests, class ids or prompts,
    against the concepts); safe: the condition of each erased sample's safe request (erased.sum() rows, in order).
    Returns [B, C, H, W] in `space` (x0 for DMD's D_real).
    """
    target = teacher_target(guided, x_t, t, cond, w, space)
    if not bool(erased.any()):
        return target
    rows = erased.to(x_t.device).nonzero().squeeze(1)
    x_e, t_e, c_e = x_t[rows], t[rows], cond_index(cond, rows)
    if safe is None:
        target[rows] = esd_target(guided.denoiser, x_e, t_e, c_e, eta, space).to(target.dtype)
        return target
    w_e = torch.as_tensor(w, dtype=target.dtype, device=x_t.device).expand(len(x_t))[rows]
    target[rows] = toward_target(guided.denoiser, x_e, t_e, safe, w_e, space, guider=guided.guider).to(target.dtype)
    return target


def preservation_target(frozen: Denoiser, x_t: Tensor, t: Tensor, cond: Any, space: str = "eps") -> Tensor:
    """The frozen model's own prediction D(x_t, cond) in `space`, the target of the preservation terms:

    - cond = null (-1): the unconditional prediction stays the frozen one (All but One, Hong et al. 2024,
      arXiv 2312.12807: constrain the drift of the unconditional prediction);
    - cond = anchor classes: predictions on unrelated conditions stay the frozen ones (SPM latent anchoring,
      Lyu et al. 2024, arXiv 2312.16145, sec. 3.3).
    x_t [B, C, H, W]; t [B]; cond [B]. Returns [B, C, H, W].
    """
    return teacher_target(GuidedDenoiser(frozen, Conditional()), x_t, t, cond, 1.0, space)


def regression_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean squared error [B] between the student's prediction and a target, both [B, C, H, W]
    in the same space (ESD, Eq. 6, in eps space; any space the caller reads both in)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)
