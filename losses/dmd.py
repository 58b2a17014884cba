"""Distribution matching (DMD/VSD): the normalised score-difference gradient, its surrogate loss,
the fake-score loss, and Decoupled DMD's split into CFG augmentation and distribution matching.

Notation (METHODS.md): x = G(z, c) is the generator's sample [B, C, H, W]; x_t = alpha x + sigma eps;
D_real and D_fake are x0-predictions (denoised estimates, NOT eps) of the guided teacher and of the
fake score at (x_t, t). With score s(x_t) = (alpha D - x_t) / sigma^2,

    s_fake - s_real = alpha / sigma^2 (D_fake - D_real),

so the reverse-KL gradient grad_theta KL(q_t || p_t) = E[alpha (s_fake - s_real) . dx/dtheta]
(Wang et al. 2023 VSD, Eq. 11; Yin et al. 2024 DMD, arXiv 2311.18828, Eq. 7) is
E[alpha^2 / sigma^2 (D_fake - D_real) . dx/dtheta]. DMD replaces the time weight alpha^2 / sigma^2 by
the per-sample normaliser 1 / mean_CHW |x - D_real| (DMD Eq. 8; DMD2, arXiv 2405.14867, sec. 3).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from guidance.denoiser import Denoiser
from guidance.schedules import _bcast
from losses.denoising import denoising_loss

NORMALIZER_FLOOR = 1e-8  # keeps 1 / mean|x - D_real| finite when the teacher reproduces x exactly


def dmd_normalizer(x: Tensor, d_ref: Tensor) -> Tensor:
    """mean_CHW |x - d_ref| per sample, [B, 1, 1, 1], in float32 (or wider), detached (DMD Eq. 8).

    x, d_ref: [B, C, H, W] (x0 space). Floored at 1e-8.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    diff = (x.detach().to(dtype) - d_ref.detach().to(dtype)).abs()
    return diff.mean(dim=tuple(range(1, x.ndim)), keepdim=True).clamp(min=NORMALIZER_FLOOR)


def dmd_grad(x: Tensor, d_real: Tensor, d_fake: Tensor, normalize: bool = True) -> Tensor:
    """The DMD gradient g = (D_fake - D_real) / mean_CHW |x - D_real| (DMD Eq. 7-8), detached.

    x:       generator samples [B, C, H, W] (x0 space).
    d_real:  guided teacher x0-prediction at (x_t, t) [B, C, H, W].
    d_fake:  fake-score x0-prediction at the same (x_t, t) [B, C, H, W].
    normalize: False gives the raw difference D_fake - D_real (the caller applies its own weight).
    Returns g [B, C, H, W] in float32 or wider. Descending along g moves x toward D_real.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    g = d_fake.detach().to(dtype) - d_real.detach().to(dtype)
    if normalize:
        g = g / dmd_normalizer(x, d_real)
    return g


def surrogate_loss(x: Tensor, g: Tensor, weight: Tensor | None = None) -> Tensor:
    """Per-sample 0.5 * mean_CHW (x - stopgrad(x - weight g))^2, [B]; d loss_b / d x_b = weight_b g_b / (C H W).

    x: [B, C, H, W] with grad; g: [B, C, H, W] (detached); weight: [B] or None (1). The value is
    0.5 mean(weight g)^2, its gradient is the point: the DMD2 form `0.5 * mse(x, (x - g).detach())`.
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    step = g if weight is None else _bcast(weight.detach(), g) * g
    target = (xf - step).detach()
    return 0.5 * (xf - target).pow(2).flatten(1).mean(1)


def dmd_loss(x: Tensor, d_real: Tensor, d_fake: Tensor, weight: Tensor | None = None, normalize: bool = True) -> Tensor:
    """DMD generator loss 0.5 ||x - stopgrad(x - g)||^2 with g from `dmd_grad`, per sample [B] (mean over CHW).

    weight: optional per-sample factor [B] on g (f-distill's h(r), a time weight); detached.
    Shapes as in `dmd_grad`. Average over the batch for the DMD2 loss value.
    """
    return surrogate_loss(x, dmd_grad(x, d_real, d_fake, normalize), weight)


def fake_score_loss(fake: Denoiser, x: Tensor, cond: Any, t: Tensor, eps: Tensor) -> Tensor:
    """The fake score's denoising loss on stopgrad(x) with fresh noise and no guidance, [B] (DMD Eq. 6).

    fake: the fake score's Denoiser; x: generator samples [B, C, H, W] (detached here); cond: their
    conditions (label-dropped by the caller if the fake score must also model the null condition);
    t: [B] fresh times; eps: [B, C, H, W] fresh noise. Same loss as the teacher's pretraining.
    """
    return denoising_loss(fake, x.detach(), cond, t, eps)


def decoupled_dmd_grad(x: Tensor, ca_cond: Tensor, ca_uncond: Tensor, w: Tensor | float, dm_fake: Tensor,
                       dm_cond: Tensor, ca_weight: float = 1.0, dm_weight: float = 1.0,
                       ca_norm: Tensor | None = None, dm_norm: Tensor | None = None) -> Tensor:
    """Decoupled DMD (Liu et al. 2025, arXiv 2511.22677, sec. 3): with D_real = D_u + w (D_c - D_u),

        D_fake - D_real = (D_fake - D_c)  -  (w - 1)(D_c - D_u)
                          distribution      CFG augmentation
                          matching (DM)     (CA)

    and each term is evaluated at its own re-noising time (the caller draws them) with its own weight:

        g = dm_weight (D_fake - D_c)|_{t_dm} / dm_norm  -  ca_weight (w - 1)(D_c - D_u)|_{t_ca} / ca_norm.

    ca_cond, ca_uncond: teacher x0-predictions at (x_{t_ca}, t_ca) [B, C, H, W]; w: [B] or scalar (our
    CFG convention, D_u + w Delta); dm_fake, dm_cond: fake score and conditional teacher at (x_{t_dm}, t_dm).
    ca_norm / dm_norm: [B, 1, 1, 1] normalisers; default mean|x - D_cfg(t_ca)| and mean|x - D_c(t_dm)|.
    With t_ca = t_dm, unit weights and both normalisers equal to mean|x - D_real|, this is `dmd_grad`.
    Returns g [B, C, H, W] (float32 or wider), detached.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    c, u = ca_cond.detach().to(dtype), ca_uncond.detach().to(dtype)
    w = _bcast(torch.as_tensor(w, dtype=dtype, device=x.device), c)
    if ca_norm is None:
        ca_norm = dmd_normalizer(x, u + w * (c - u))
    if dm_norm is None:
        dm_norm = dmd_normalizer(x, dm_cond)
    dm = dm_fake.detach().to(dtype) - dm_cond.detach().to(dtype)
    return dm_weight * dm / dm_norm - ca_weight * (w - 1) * (c - u) / ca_norm


def decoupled_dmd_loss(x: Tensor, *args, **kwargs) -> Tensor:
    """Surrogate loss [B] whose gradient w.r.t. x is `decoupled_dmd_grad(x, ...)` / (C H W)."""
    return surrogate_loss(x, decoupled_dmd_grad(x, *args, **kwargs))
