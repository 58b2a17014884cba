"""Noise schedules: alpha(t), sigma(t) on t in [0, 1] (t = 0 clean data, t = 1 pure noise).

x_t = alpha(t) * x0 + sigma(t) * eps. Every schedule also says how its time is fed to a network
(`net_time`), which times training draws (`sample_t`) and which grid samplers walk (`sampling_times`).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


class Schedule(ABC):
    """Base class. `t` is a tensor of any shape; outputs have the same shape and dtype."""

    t_min: float = 0.0
    t_max: float = 1.0
    time_scale: float = 1000.0  # network time input = t * time_scale (diffusers' timestep range)

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor: ...

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.alpha(t), self.sigma(t)

    def d_alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(d alpha/dt, d sigma/dt) at t, by autograd in float64 (exact for the closed forms here)."""
        tt = t.detach().double().requires_grad_(True)
        with torch.enable_grad():
            out = []
            for f in (self.alpha, self.sigma):
                y = f(tt)
                out.append(torch.autograd.grad(y.sum(), tt)[0] if y.requires_grad else torch.zeros_like(tt))
        return out[0].to(t.dtype), out[1].to(t.dtype)

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha^2 / sigma^2)."""
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def net_time(self, t: Tensor) -> Tensor:
        """The time value a network is conditioned on (float timesteps in diffusers' range)."""
        return t * self.time_scale

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps; x0, eps [B, ...], t [B]."""
        a, s = self.alpha_sigma(_bcast(t, x0))
        return a * x0 + s * eps

    def sample_t(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Training times [n], uniform on [t_min, t_max] unless the schedule says otherwise."""
        u = torch.rand(n, generator=generator, device=device)
        return self.t_min + u * (self.t_max - self.t_min)

    def sampling_times(self, steps: int, device=None) -> Tensor:
        """Descending grid [steps] from t_max; the sampler's last step goes to clean data (t = 0)."""
        if steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {steps}")
        return torch.linspace(self.t_max, self.t_min, steps + 1, dtype=torch.float64, device=device)[:-1]

    def describe(self) -> dict:
        """JSON-able description, recorded in checkpoints and exported configs."""
        return {"class": type(self).__name__, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    """Reshape per-sample t [B] to broadcast against like [B, ...]."""
    t = torch.as_tensor(t, device=like.device)
    if t.ndim == 0:
        return t.to(like.dtype)
    return t.to(like.dtype).reshape(t.shape[0], *([1] * (like.ndim - 1)))


class _DiscreteVP(Schedule):
    """Shared code for DDPM-style schedules with T discrete steps (Ho et al. 2020, arXiv 2006.11239).

    Step i in 0..T-1 sits at t = i / (T - 1) and has alpha_bar[i] = prod_{j<=i} (1 - beta_j).
    Between grid points log-SNR is interpolated linearly, so random continuous t also works.
    """

    def __init__(self, num_steps: int):
        self.num_steps = int(num_steps)
        self.time_scale = float(self.num_steps - 1)  # net time = discrete timestep index, as diffusers
        self._log_snr_grid: Tensor | None = None

    @abstractmethod
    def betas(self) -> Tensor: ...

    def _grid(self, device) -> Tensor:
        if self._log_snr_grid is None:
            alpha_bar = torch.cumprod(1 - self.betas().double(), 0)
            self._log_snr_grid = torch.log(alpha_bar) - torch.log1p(-alpha_bar)
        return self._log_snr_grid.to(device)

    def log_snr(self, t: Tensor) -> Tensor:
        grid = self._grid(t.device)
        pos = t.double().clamp(0, 1) * (self.num_steps - 1)
        lo = pos.floor().long().clamp(max=self.num_steps - 2)
        frac = pos - lo
        out = grid[lo] * (1 - frac) + grid[lo + 1] * frac
        return out.to(t.dtype)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.sigmoid(self.log_snr(t)).sqrt()

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sigmoid(-self.log_snr(t)).sqrt()

    def sample_t(self, n, generator=None, device=None):
        i = torch.randint(0, self.num_steps, (n,), generator=generator, device=device)
        return i.float() / (self.num_steps - 1)

    def sampling_times(self, steps, device=None):
        """DDIM's "trailing" spacing (Lin et al. 2024, arXiv 2305.08891, Table 2): starts at the last step."""
        if steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {steps}")
        idx = torch.round(torch.arange(self.num_steps, 0, -self.num_steps / steps, dtype=torch.float64)) - 1
        return (idx / (self.num_steps - 1)).to(device)

    def describe(self):
        return {"class": type(self).__name__, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


class VPLinear(_DiscreteVP):
    """DDPM linear betas (Ho et al. 2020); `scaled=True` is Stable Diffusion's "scaled_linear"."""

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, scaled: bool = False):
        super().__init__(num_steps)
        self.beta_start, self.beta_end, self.scaled = beta_start, beta_end, scaled

    def betas(self):
        if self.scaled:
            return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, self.num_steps, dtype=torch.float64) ** 2
        return torch.linspace(self.beta_start, self.beta_end, self.num_steps, dtype=torch.float64)


class VPCosine(_DiscreteVP):
    """Discrete cosine schedule (Nichol & Dhariwal 2021, arXiv 2102.09672, Eq. 17), betas clipped at max_beta."""

    def __init__(self, num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        super().__init__(num_steps)
        self.s, self.max_beta = s, max_beta

    def betas(self):
        f = lambda u: torch.cos((u + self.s) / (1 + self.s) * math.pi / 2) ** 2  # noqa: E731
        u = torch.arange(self.num_steps + 1, dtype=torch.float64) / self.num_steps
        return (1 - f(u[1:]) / f(u[:-1])).clamp(max=self.max_beta)


class VPLinearContinuous(Schedule):
    """Continuous-time VP SDE (Song et al. 2021, arXiv 2011.13456, Eq. 11 and 33):
    log alpha(t) = -(beta_min t + (beta_max - beta_min) t^2 / 2) / 2, sigma = sqrt(1 - alpha^2)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3):
        self.beta_min, self.beta_max, self.t_min = beta_min, beta_max, t_min

    def _log_alpha(self, t):
        return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def alpha(self, t):
        return torch.exp(self._log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t)))


class VPCosineContinuous(Schedule):
    """Continuous cosine schedule: alpha = cos(pi/2 * (t + s)/(1 + s)) / cos(pi/2 * s/(1 + s)),
    sigma = sqrt(1 - alpha^2) (Nichol & Dhariwal 2021, Eq. 17); t_max keeps alpha > 0."""

    def __init__(self, s: float = 0.008, t_min: float = 1e-4, t_max: float = 0.9946):
        self.s, self.t_min, self.t_max = s, t_min, t_max

    def alpha(self, t):
        c0 = math.cos(math.pi / 2 * self.s / (1 + self.s))
        return torch.cos(math.pi / 2 * (t + self.s) / (1 + self.s)) / c0

    def sigma(self, t):
        return torch.sqrt((1 - self.alpha(t) ** 2).clamp(min=0))


class RectifiedFlow(Schedule):
    """Rectified flow (Liu et al. 2022, arXiv 2209.03003; Esser et al. 2024, arXiv 2403.03206):
    alpha = 1 - t, sigma = t. `shift` > 1 moves sampling and training time toward noise as in SD3
    (t' = shift t / (1 + (shift - 1) t), Esser et al. Eq. 23); `logit_normal` draws training t from
    the logit-normal density (Esser et al. sec. 3.1)."""

    def __init__(self, shift: float = 1.0, logit_normal: bool = False, t_min: float = 0.0, t_max: float = 1.0):
        if shift <= 0:
            raise ValueError(f"RectifiedFlow shift must be > 0, got {shift}")
        self.shift, self.logit_normal, self.t_min, self.t_max = shift, logit_normal, t_min, t_max

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return t

    def _shift(self, t):
        return self.shift * t / (1 + (self.shift - 1) * t)

    def sample_t(self, n, generator=None, device=None):
        if self.logit_normal:
            u = torch.sigmoid(torch.randn(n, generator=generator, device=device))
        else:
            u = torch.rand(n, generator=generator, device=device)
        return self._shift(self.t_min + u * (self.t_max - self.t_min))

    def sampling_times(self, steps, device=None):
        return self._shift(super().sampling_times(steps, device))


class EDM(Schedule):
    """EDM (Karras et al. 2022, arXiv 2206.00364): alpha = 1, sigma(t) = (smin^(1/rho) + t (smax^(1/rho)
    - smin^(1/rho)))^rho, so a uniform t grid is the paper's step discretisation (Eq. 5). Training
    draws ln sigma ~ N(p_mean, p_std^2) (Table 1)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 p_mean: float = -1.2, p_std: float = 1.2):
        self.sigma_min, self.sigma_max, self.rho, self.p_mean, self.p_std = sigma_min, sigma_max, rho, p_mean, p_std

    def alpha(self, t):
        return torch.ones_like(t)

    def sigma(self, t):
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (lo + t * (hi - lo)) ** self.rho

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (sigma ** (1 / self.rho) - lo) / (hi - lo)

    def sample_t(self, n, generator=None, device=None):
        ln_sigma = self.p_mean + self.p_std * torch.randn(n, generator=generator, device=device)
        return self.t_of_sigma(ln_sigma.exp().clamp(self.sigma_min, self.sigma_max))


SCHEDULES = {
    "vp_linear": VPLinear,
    "vp_cosine": VPCosine,
    "vp_linear_continuous": VPLinearContinuous,
    "vp_cosine_continuous": VPCosineContinuous,
    "rectified_flow": RectifiedFlow,
    "edm": EDM,
}
