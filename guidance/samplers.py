"""Samplers over a guided denoiser: DDIM (with eta), Euler on the probability-flow ODE (the flow
sampler), DPM-Solver++(2M). They read only Prediction.x0 / .eps and the schedule's alpha, sigma, so
they work with every parameterisation and schedule."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from guidance.guided import GuidedDenoiser
from guidance.noise import standard_normal
from guidance.parameterization import Prediction
from guidance.schedules import Schedule, _bcast


def _clean_time(t: Tensor) -> Tensor:
    return torch.full_like(t, -1.0)  # marker: the step after the last one reaches clean data


def _alpha_sigma(schedule: Schedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """alpha, sigma at t [B] broadcast to like; t < 0 means clean data (alpha = 1, sigma = 0)."""
    tt = _bcast(t, like)
    a, s = schedule.alpha_sigma(tt.clamp(min=0))
    clean = tt < 0
    return torch.where(clean, torch.ones_like(a), a), torch.where(clean, torch.zeros_like(s), s)


def ddim_step(pred: Prediction, x: Tensor, t_next: Tensor, schedule: Schedule, eta: float = 0.0,
              generator: torch.Generator | None = None, state: dict | None = None) -> Tensor:
    """DDIM (Song et al. 2021, arXiv 2010.02502, Eq. 12), written for any alpha, sigma:
    x' = alpha' x0 + sqrt(sigma'^2 - c^2) eps + c z, c = eta sigma' sqrt(1 - (alpha sigma')^2 / (alpha' sigma)^2)
    (the DDPM posterior std, so eta = 1 is ancestral sampling). Uses pred.eps for re-noising, which
    CFG++ sets to the unconditional eps (Chung et al. 2025, arXiv 2406.08070, Algorithm 1)."""
    a_n, s_n = _alpha_sigma(schedule, t_next, x)
    if eta == 0:
        return a_n * pred.x0 + s_n * pred.eps
    ratio = (pred.alpha * s_n) / (a_n * pred.sigma)
    c = eta * s_n * (1 - ratio**2).clamp(min=0).sqrt()
    z = standard_normal(x.shape, generator, x.device, x.dtype)  # on the generator's device (a CPU one), then moved
    return a_n * pred.x0 + (s_n**2 - c**2).clamp(min=0).sqrt() * pred.eps + c * z


def euler_step(pred: Prediction, x: Tensor, t_next: Tensor, schedule: Schedule, eta: float = 0.0,
               generator=None, state=None) -> Tensor:
    """Euler on the probability-flow ODE dx/dt = alpha'(t) x0 + sigma'(t) eps (the marginal velocity of
    the Gaussian path; Lipman et al. 2023, arXiv 2210.02747, Eq. 20). For rectified flow this is
    x' = x + (t' - t) (eps - x0), the flow-matching Euler sampler (Liu et al. 2022). CFG++ re-noises
    with the unconditional eps (Chung et al. 2025, sec. 3.3 for flows)."""
    x = pred.x_t.to(x.dtype)  # continue from the guider's x_t (FlowChef moves it)
    t = state["t"]
    da, ds = schedule.d_alpha_sigma(t)
    dt = torch.where(t_next < 0, torch.zeros_like(t_next), t_next) - t
    v = _bcast(da, x) * pred.x0 + _bcast(ds, x) * pred.eps
    x_next = x + _bcast(dt, x) * v
    return torch.where(_bcast(t_next, x) < 0, pred.x0, x_next)


def dpmpp_2m_step(pred: Prediction, x: Tensor, t_next: Tensor, schedule: Schedule, eta: float = 0.0,
                  generator=None, state: dict | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2), data prediction, lambda = log(alpha/sigma):
    x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) D,  D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1},  r = h_prev / h.
    First step and the final step to clean data are first order (as diffusers' lower_order_final)."""
    x = pred.x_t.to(x.dtype)  # continue from the guider's x_t (FlowChef moves it)
    a_n, s_n = _alpha_sigma(schedule, t_next, x)
    if bool((t_next < 0).all()):
        return pred.x0
    lam = torch.log(pred.alpha) - torch.log(pred.sigma)
    lam_n = torch.log(a_n) - torch.log(s_n)
    h = lam_n - lam
    d = pred.x0
    if state.get("prev_x0") is not None:
        r = state["prev_h"] / h
        d = (1 + 1 / (2 * r)) * pred.x0 - 1 / (2 * r) * state["prev_x0"]
    state["prev_x0"], state["prev_h"] = pred.x0, h
    return (s_n / pred.sigma) * x - a_n * torch.expm1(-h) * d


def _clip(pred: Prediction, c: float, keep_eps: bool) -> Prediction:
    x0 = pred.x0.clamp(-c, c)
    if keep_eps:  # CFG++: re-noise with the unconditional eps it chose
        return Prediction(x_t=pred.x_t, alpha=pred.alpha, sigma=pred.sigma, x0=x0, eps=pred.eps)
    return Prediction.from_x0(x0, pred.x_t, pred.alpha, pred.sigma)


SAMPLERS: dict[str, Callable] = {"ddim": ddim_step, "euler": euler_step, "dpmpp_2m": dpmpp_2m_step}


def check_sampler(name: str, steps: int) -> None:
    """Validate a sampler name and step count with a message that says what to change."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(SAMPLERS)}")
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


@torch.no_grad()
def sample(guided: GuidedDenoiser, noise: Tensor, cond: Any, w: Tensor | float = 1.0, steps: int = 50,
           sampler: str = "ddim", eta: float = 0.0, neg_cond: Any = None, generator: torch.Generator | None = None,
           progress: bool = False, clip_denoised: float | None = None) -> Tensor:
    """Generate x0 [B, C, H, W] from noise [B, C, H, W] (unit Gaussian; scaled by sigma(t_max) here).

    cond: conditions for the batch; w: per-sample guidance scale [B] or scalar; steps: network-call
    steps (each costs the guider's branch count in evaluations, see guided.nfe); clip_denoised: clamp
    the denoised x0 to [-c, c] at every step and re-derive eps from it (pixel-space data in [-1, 1]; the
    "clip_sample" of Ho et al. 2020's sampler); leave None for latents.
    """
    check_sampler(sampler, steps)
    schedule = guided.schedule
    step_fn = SAMPLERS[sampler]
    b = noise.shape[0]
    times = schedule.sampling_times(steps, device=noise.device).to(noise.dtype)
    a0, s0 = schedule.alpha_sigma(times[:1])
    # Start from the prior at t_max, scaled to the std of x_t for unit-variance data: sqrt(alpha^2 + sigma^2)
    # (1 for VP and rectified flow, sqrt(sigma_max^2 + 1) for EDM), as diffusers' init_noise_sigma.
    x = noise * (a0**2 + s0**2).sqrt()
    state_g = guided.guider.init_state(b)
    state_s: dict = {}
    it = range(steps)
    for i in tqdm(it, desc=f"{sampler} x{steps}", disable=None if progress else True, leave=False):
        t = times[i].expand(b)
        t_next = times[i + 1].expand(b) if i + 1 < steps else _clean_time(t)
        pred, state_g = guided.guide(x, t, cond, w, neg_cond, state_g)
        if clip_denoised is not None:
            pred = _clip(pred, clip_denoised, keep_eps=guided.guider.overrides_eps)
        state_s["t"] = t
        x = step_fn(pred, x, t_next, schedule, eta=eta, generator=generator, state=state_s)
    return x


@torch.no_grad()
def sample_until(guided: GuidedDenoiser, noise: Tensor, cond: Any, w: Tensor | float = 1.0, steps: int = 50,
                 stop: int | None = None, sampler: str = "ddim", eta: float = 0.0, neg_cond: Any = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The point of a sampling trajectory after its first `stop` steps: (x [B, C, H, W], t [B]).

    The trajectory is `sample`'s with the same arguments (default: DDIM, Song et al. 2021, arXiv 2010.02502,
    Eq. 12, on `steps` points of schedule.sampling_times): it starts from noise [B, C, H, W] (unit Gaussian, scaled
    by sqrt(alpha^2 + sigma^2) at t_max) and runs steps 0 .. stop - 1. Returns x_t at t = sampling_times(steps)[stop]
    (stop = 0: the scaled noise at t_max, no evaluation), or, for stop = steps (the default), the sample itself with
    t = -1 (the samplers' clean-data marker): then x equals sample(...) exactly. Distillation and erasure draw
    on-policy x_t from here (a guided teacher's own trajectory down to a random grid step, ESD sec. 3) instead of
    noising data. cond, w, eta, neg_cond, generator: as `sample` (w [B] or scalar, this project's CFG convention).
    """
    check_sampler(sampler, steps)
    stop = steps if stop is None else stop
    if int(stop) != stop or not 0 <= stop <= steps:
        raise ValueError(f"stop must be a step index in 0..{steps} (steps={steps}), got {stop}")
    stop = int(stop)
    schedule, step_fn, b = guided.schedule, SAMPLERS[sampler], noise.shape[0]
    times = schedule.sampling_times(steps, device=noise.device).to(noise.dtype)
    a0, s0 = schedule.alpha_sigma(times[:1])
    x = noise * (a0**2 + s0**2).sqrt()  # as `sample`: the prior at t_max for unit-variance data
    state_g, state_s = guided.guider.init_state(b), {}
    for i in range(stop):
        t = times[i].expand(b)
        t_next = times[i + 1].expand(b) if i + 1 < steps else _clean_time(t)
        pred, state_g = guided.guide(x, t, cond, w, neg_cond, state_g)
        state_s["t"] = t
        x = step_fn(pred, x, t_next, schedule, eta=eta, generator=generator, state=state_s)
    return x, (times[stop].expand(b) if stop < steps else _clean_time(times[0].expand(b)))
