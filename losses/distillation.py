"""Guidance distillation (Meng et al. 2023) and progressive distillation (Salimans & Ho 2022) losses and targets.

Both regress a deterministic target, x0-hat(z_t) of a frozen teacher, so the loss floor is ZERO (reached
by a student equal to the target function), unlike denoising score matching whose floor is the posterior
variance. The loss is an x0 error times a per-sample weight; an error in another parameterisation is the
same thing with a different weight, since every parameterisation is affine in x0 at fixed (x_t, alpha, sigma):

    y = (x0 - B x_t) / A   =>   ||y_s - y_t||^2 = ||x0_s - x0_t||^2 / A^2,
    eps: 1/A^2 = alpha^2/sigma^2 (SNR);  v: 1/A^2 = (alpha^2 + sigma^2)^2 / sigma^2 (= 1 + SNR on VP);  x0: 1.

Computing the error in x0 and scaling it avoids the cancellation of (x_t - alpha x0)/sigma at small sigma.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from guidance.parameterization import Prediction, x0_coefficients

W_DISTRIBUTIONS = ("uniform", "log_uniform")
WEIGHTINGS = ("none", "snr", "snr_trunc", "snr_plus_one")
LOSS_SPACES = ("x0", "eps", "v")


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return value


def check_w_range(w_min: float, w_max: float, distribution: str) -> str:
    """Refuse, saying what to change, a training range of w that sample_guidance_scale cannot draw from; returns the
    distribution."""
    if not w_min <= w_max:
        raise ValueError(f"w_min ({w_min}) must not exceed w_max ({w_max})")
    if check_choice("w distribution", distribution, W_DISTRIBUTIONS) == "log_uniform" and w_min <= 0:
        raise ValueError(f"w_distribution 'log_uniform' needs w_min > 0, got {w_min}; use 'uniform' or raise w_min")
    return distribution


def sample_guidance_scale(n: int, w_min: float, w_max: float, distribution: str = "uniform",
                          generator: torch.Generator | None = None, device=None) -> Tensor:
    """Per-sample guidance scales w [n] on [w_min, w_max] (Meng et al. 2023, sec. 4.1: w ~ U[w_min, w_max]).

    "log_uniform" draws log w uniformly (needs w_min > 0); it spends more samples at small scales.
    """
    u = torch.rand(n, generator=generator, device=device)
    if distribution == "uniform":
        return w_min + u * (w_max - w_min)
    if distribution == "log_uniform":
        return torch.exp(math.log(w_min) + u * (math.log(w_max) - math.log(w_min)))
    raise ValueError(f"unknown w distribution {distribution!r}; choose one of {', '.join(W_DISTRIBUTIONS)}")


def loss_weight(weighting: str, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Weight of the x0 error, broadcast like alpha, sigma ([B, 1, 1, 1]); Salimans & Ho 2022 (arXiv
    2202.00512), sec. 4: "none" ||x - x^||^2; "snr" alpha^2/sigma^2 (= eps MSE); "snr_trunc" max(SNR, 1)
    (truncated SNR, = max(x MSE, eps MSE)); "snr_plus_one" 1 + SNR (= v MSE on a VP schedule)."""
    if weighting == "none":
        return torch.ones_like(sigma)
    snr = alpha**2 / sigma**2
    if weighting == "snr":
        return snr
    if weighting == "snr_trunc":
        return snr.clamp(min=1.0)
    if weighting == "snr_plus_one":
        return 1.0 + snr
    raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


def space_factor(space: str, alpha: Tensor, sigma: Tensor) -> Tensor:
    """1/A^2 with x0 = A y + B x_t for outputs y in `space`: turns an x0 squared error into that space's."""
    a, _ = x0_coefficients(check_choice("loss space", space, LOSS_SPACES), alpha, sigma)
    return 1.0 / a**2


def guidance_distillation_loss(student: Prediction, target_x0: Tensor, space: str = "x0",
                               weighting: str = "snr_trunc") -> Tensor:
    """Per-sample loss [B]: weight(lambda_t) * mean over pixels of (y_student - y_target)^2 in `space`.

    student:   the student's Prediction at (x_t [B, C, H, W], alpha, sigma [B, 1, 1, 1]).
    target_x0: [B, C, H, W] the target in x0 space (the guided teacher's x0 for stage 1, Meng et al. 2023
               sec. 4.1: E ||x^_student(z_t, w) - x^_teacher^w(z_t)||^2 with a weight omega(lambda_t); the
               two-step DDIM target x~ of `progressive_target` for stage 2, Salimans & Ho 2022 Algorithm 2).
    space:     x0, eps or v: the error is measured on that parameterisation of both predictions.
    weighting: see `loss_weight`; x0 + "snr_trunc" is Salimans & Ho's truncated-SNR choice, and
               x0 + "snr_plus_one" equals v + "none" on VP schedules.
    The target carries no gradient (detached here). Floor: 0, at student.x0 == target_x0. Returns float32
    or wider (float64 inputs give float64).
    """
    dtype = torch.promote_types(student.x0.dtype, torch.float32)  # float32 or wider (float64 stays float64)
    err = (student.x0.to(dtype) - target_x0.detach().to(dtype)).pow(2)
    scale = loss_weight(weighting, student.alpha, student.sigma) * space_factor(space, student.alpha, student.sigma)
    return (scale.to(dtype) * err).flatten(1).mean(1)


def progressive_target(x_t: Tensor, x_next: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_next: Tensor,
                       sigma_next: Tensor) -> Tensor:
    """The x0 whose single DDIM step from (x_t, t) lands on x_next at t'' (Salimans & Ho 2022, Algorithm 2):

        x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t),

    where z_t'' = x_next is the result of TWO deterministic DDIM steps t -> t' -> t'' of the teacher.
    A DDIM step with x0 = x~ gives alpha'' x~ + sigma'' (z_t - alpha x~)/sigma = z_t'' exactly.
    x_t, x_next: [B, C, H, W]; alphas/sigmas broadcast to them ([B, 1, 1, 1]); sigma_next = 0, alpha_next = 1
    (the last step, to clean data) gives x~ = x_next. Returns [B, C, H, W].
    """
    ratio = sigma_next / sigma_t
    return (x_next - ratio * x_t) / (alpha_next - ratio * alpha_t)
