"""Score identity Distillation (SiD, Zhou et al. 2024, arXiv 2404.04057) and its long-short guided form (SiD-LSG,
arXiv 2406.01561): the generator loss, its per-sample normaliser, and the fake score's guided denoising loss.

Notation (METHODS.md): x = G(z, c) is the generator's sample [B, C, H, W] WITH gradient; x_t = alpha x + sigma eps
(also with gradient: SiD differentiates through both score networks at x_t, their weights frozen for the update);
f_phi = D_real and f_psi = D_fake are the x0-predictions of the (guided) teacher and of the fake score at (x_t, t).

The generator loss (the paper's alpha-weighted loss, written here as the authors' code computes it:
mingyuanzhou/SiD training/sid_loss.py lines 53-55, and mingyuanzhou/SiD-LSG training/sid_training_loop.py
lines 522-528) is, per sample,

    L = (f_phi - f_psi) . ((f_phi - x) - alpha (f_phi - f_psi)) / stopgrad(mean_CHW |x - f_phi|)
      = [(1 - alpha) ||f_phi - f_psi||^2 + (f_phi - f_psi) . (f_psi - x)] / stopgrad(...),

differentiated through x, f_phi(x_t) and f_psi(x_t) (nothing but the normaliser is detached). alpha = 1 gives
(f_phi - f_psi) . (f_psi - x) (SiD-LSG line 526); the authors' default alpha is 1.2 (SiD sid_train.py line 99) and 1
for Stable Diffusion (SiD-LSG run_sid.sh line 73). The authors sum over C, H, W and divide by the batch (SiD
sid_training_loop.py line 332; a further loss_scaling_G of 100 on EDM); here the per-sample value is the mean over
C, H, W (as losses.dmd's), which is their loss / (C H W): the same direction, Adam's update is unchanged (up to eps).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from guidance.conditions import cond_cat
from guidance.denoiser import Denoiser
from guidance.parameterization import raw_target
from guidance.schedules import _bcast
from losses.dmd import dmd_normalizer, fake_score_loss

SID_ALPHA = 1.2  # SiD's default alpha (mingyuanzhou/SiD sid_train.py line 99)
NORMALIZER_FLOOR = 1e-5  # the authors' clip(min=0.00001) of the weight factor (SiD sid_loss.py line 54)


def sid_normalizer(x: Tensor, d_real: Tensor) -> Tensor:
    """mean_CHW |x - d_real| per sample, [B, 1, 1, 1], float32 (or wider), detached, floored at 1e-5 (SiD
    sid_loss.py line 54; SiD-LSG sid_training_loop.py line 523). x, d_real: [B, C, H, W]."""
    return dmd_normalizer(x, d_real).clamp(min=NORMALIZER_FLOOR)


def sid_generator_loss(x: Tensor, d_real: Tensor, d_fake: Tensor, alpha: float = SID_ALPHA,
                       normalize: bool = True) -> Tensor:
    """SiD's generator loss per sample [B]: mean_CHW of (f_phi - f_psi) . ((f_phi - x) - alpha (f_phi - f_psi)) / w.

    x:      generator samples [B, C, H, W], with gradient.
    d_real: f_phi, the (guided) teacher's x0-prediction at x_t = alpha_t x + sigma_t eps [B, C, H, W], computed WITH
            gradient through x_t (the teacher's weights frozen).
    d_fake: f_psi, the fake score's x0-prediction at the same (x_t, t) [B, C, H, W], also with gradient through x_t.
    alpha:  SiD's alpha (1.2 default; 1: (f_phi - f_psi) . (f_psi - x)).
    normalize: divide by w = stopgrad(mean_CHW |x - f_phi|) (floored at 1e-5); False: w = 1 (the caller weights).
    Computed in float32 (or wider). Minimising it moves the generator's distribution toward the teacher's
    (SiD sec. 3; the gradient is the authors' approximation of the model-based explicit score-matching loss).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf, real, fake = x.to(dtype), d_real.to(dtype), d_fake.to(dtype)
    diff = real - fake
    loss = diff * ((real - xf) - alpha * diff)
    if normalize:
        loss = loss / sid_normalizer(x, d_real)
    return loss.flatten(1).mean(1)


def guided_denoising_loss(fake: Denoiser, x: Tensor, cond: Any, t: Tensor, eps: Tensor, scale: float) -> Tensor:
    """The fake score's denoising loss with its own output guided at `scale`, per sample [B] (SiD-LSG's kappa_1).

    SiD-LSG trains the fake score on stopgrad(x) through its CFG combination raw_u + scale (raw_c - raw_u) (eps in
    the authors' code: SiD-LSG training/sid_training_loop.py lines 418-443, the rule in training/sid_sd_util.py
    line 265), so the guided fake score, not the conditional one, fits the generator's samples. Every
    parameterisation here is affine in the raw output with coefficients that do not depend on the condition, so
    guiding the raw outputs guides D. scale 1 is the plain loss (losses.dmd.fake_score_loss: the network's own
    pretraining loss, losses.denoising). x: [B, C, H, W] (detached here); cond: the (label-dropped) conditions;
    t: [B]; eps: [B, C, H, W].
    """
    if scale == 1.0:
        return fake_score_loss(fake, x, cond, t, eps)
    x0 = x.detach()
    b = x0.shape[0]
    a, s = fake.schedule.alpha_sigma(_bcast(t, x0))
    x_t = a * x0 + s * eps
    dtype = torch.promote_types(x0.dtype, torch.float32)
    y = fake.raw(torch.cat([x_t, x_t]), torch.cat([t, t]), cond_cat([cond, fake.null_cond(cond)])).to(dtype)
    guided = y[b:] + scale * (y[:b] - y[b:])
    target = raw_target(fake.parameterization, x0, eps, a, s, fake.sigma_data)
    return (guided - target.to(dtype)).pow(2).flatten(1).mean(1)
