"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", arXiv 2310.04378), following
consistency distillation (Song et al. 2023, "Consistency Models", arXiv 2303.01469): the pieces that are formulas.

- The solver grid with skipping step k: N points t_0 > t_1 > ... > t_{N-1} of the schedule's DDIM grid
  (schedule.sampling_times(N); on a 1000-step VP schedule with N = 50 the timesteps 999, 979, ..., 19, i.e. k = 20,
  the grid of LCM's DDIMSolver); a consistency step maps t_i to t_{i+1} and the last point to t_min (timestep 0).
- The boundary condition (LCM Eq. 9, the discrete form of Song et al. 2023, appendix C): with the network's
  timestep tau and s = timestep_scaling (LCM code: 10), sigma_data = 0.5,
      c_skip(tau) = sigma_data^2 / ((s tau)^2 + sigma_data^2),  c_out(tau) = s tau / sqrt((s tau)^2 + sigma_data^2),
      f(x_t, t) = c_skip x_t + c_out x0_hat(x_t, t),
  so f(x, 0) = x (c_skip = 1, c_out = 0): diffusers' LCMScheduler.get_scalings_for_boundary_condition_discrete.
- The distance d: pseudo-Huber sqrt(d^2 + c^2) - c (Song & Dhariwal 2023, arXiv 2310.14189, sec. 3.3; the LCM
  training code's "huber" with c = 0.001), averaged over elements, or the squared error ("l2").
"""
from __future__ import annotations

import torch
from torch import Tensor

from guidance.schedules import Schedule, _bcast

SIGMA_DATA = 0.5        # LCM code and diffusers' LCMScheduler
TIMESTEP_SCALING = 10.0  # ibid.
LOSSES = ("huber", "l2")


def solver_grid(schedule: Schedule, steps: int, device=None) -> tuple[Tensor, Tensor]:
    """(t [N], t_next [N]) float64: the N-point solver grid, descending from t_max, and each point's target time (the
    next grid point; schedule.t_min after the last). steps: N (LCM: 50, i.e. skipping step k = 1000 / 50 = 20)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"solver_steps must be a positive integer (LCM: 50), got {steps!r}")
    t = schedule.sampling_times(steps, device=device).double()
    if steps > 1 and not bool((t[1:] < t[:-1]).all()):
        limit = getattr(schedule, "num_steps", None)
        raise ValueError(f"{type(schedule).__name__}.sampling_times({steps}) repeats times; choose solver_steps <= "
                         f"{limit if limit else 'the schedule resolution'} (LCM: 50)")
    return t, torch.cat([t[1:], t.new_full((1,), float(schedule.t_min))])


def boundary_scalings(timestep: Tensor, sigma_data: float = SIGMA_DATA,
                      timestep_scaling: float = TIMESTEP_SCALING) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) at network timesteps tau (any shape): the LCM boundary condition (module docstring)."""
    s = timestep * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def consistency_output(x_t: Tensor, x0: Tensor, t: Tensor, schedule: Schedule,
                       timestep_scaling: float = TIMESTEP_SCALING) -> Tensor:
    """f(x_t, t) = c_skip x_t + c_out x0 [B, C, H, W] at times t [B] (the network's timestep schedule.net_time(t))."""
    c_skip, c_out = boundary_scalings(_bcast(schedule.net_time(t), x_t), timestep_scaling=timestep_scaling)
    return c_skip * x_t + c_out * x0


def consistency_distance(pred: Tensor, target: Tensor, loss: str = "huber", huber_c: float = 0.001) -> Tensor:
    """Per-sample distance [B] between pred and target [B, ...]: the mean over elements of the pseudo-Huber
    sqrt((pred - target)^2 + c^2) - c, or of the squared error (module docstring). Computed in float32 or wider."""
    diff = pred.float() - target.float()
    if loss == "huber":
        per = (diff**2 + huber_c**2).sqrt() - huber_c
    elif loss == "l2":
        per = diff**2
    else:
        raise ValueError(f"unknown consistency loss {loss!r}; choose one of {', '.join(LOSSES)}")
    return per.flatten(1).mean(1)


def lcm_inference_indices(solver_steps: int, steps: int) -> list[int]:
    """The grid indices a `steps`-step LCM sampler visits on the N-point solver grid: floor(linspace(0, N, steps,
    endpoint=False)), diffusers' LCMScheduler.set_timesteps (its default schedule, strength 1)."""
    if not isinstance(steps, int) or not 1 <= steps <= solver_steps:
        raise ValueError(f"a consistency model distilled on a {solver_steps}-point grid samples with 1 to "
                         f"{solver_steps} steps (LCM: 1, 2, 4 or 8); got {steps!r}")
    return [int(i) for i in torch.floor(torch.linspace(0, solver_steps, steps + 1, dtype=torch.float64)[:-1]).tolist()]
