"""The denoising (score-matching) loss in the network's own parameterisation."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from guidance.denoiser import Denoiser
from guidance.parameterization import raw_target
from guidance.schedules import _bcast


def denoising_loss(denoiser: Denoiser, x0: Tensor, cond: Any, t: Tensor, eps: Tensor) -> Tensor:
    """Per-sample MSE between the network's raw output and its exact target, [B].

    x0, eps: [B, C, H, W]; t: [B]. eps-prediction is Ho et al. 2020 (arXiv 2006.11239, Eq. 14, "L_simple"),
    v-prediction Salimans & Ho 2022 (arXiv 2202.00512, sec. 4), flow matching Lipman et al. 2023 /
    Liu et al. 2022 (target eps - x0), EDM Karras et al. 2022 (Eq. 8, unit effective weight).
    """
    a, s = denoiser.schedule.alpha_sigma(_bcast(t, x0))
    x_t = a * x0 + s * eps
    y = denoiser.raw(x_t, t, cond)
    target = raw_target(denoiser.parameterization, x0, eps, a, s, denoiser.sigma_data)
    return (y.float() - target.float()).pow(2).flatten(1).mean(1)
