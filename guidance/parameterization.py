"""Network parameterisations (eps, x0, v, flow, edm) and the Prediction object that reads any of them.

Every parameterisation is affine in the raw output y: x0 = A(alpha, sigma) * y + B(alpha, sigma) * x_t,
and eps = (x_t - alpha * x0) / sigma. A Prediction stores x0 (the denoised D) and eps; it can be read
back in any parameterisation, so guiders and samplers never care what the network predicts.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

PARAMETERIZATIONS = ("eps", "x0", "v", "flow", "edm")


def check_parameterization(kind: str) -> str:
    if kind not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {kind!r}; choose one of {', '.join(PARAMETERIZATIONS)}")
    return kind


def x0_coefficients(kind: str, alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor]:
    """(A, B) with x0 = A * y + B * x_t for raw output y of parameterisation `kind`.

    eps:  x0 = (x_t - sigma eps) / alpha                         (Ho et al. 2020, Eq. 4 solved for x0)
    x0:   x0 = y
    v:    v = alpha eps - sigma x0  =>  x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)
          (Salimans & Ho 2022, arXiv 2202.00512, sec. 4; general form, equal when alpha^2 + sigma^2 = 1)
    flow: u = eps - x0              =>  x0 = (x_t - sigma u) / (alpha + sigma)
          (rectified flow velocity, Liu et al. 2022; alpha + sigma = 1 there)
    edm:  D = c_skip x + c_out F on x = x_t / alpha, sigma_e = sigma / alpha
          (Karras et al. 2022, arXiv 2206.00364, Eq. 7 and Table 1)
    """
    if kind == "eps":
        return -sigma / alpha, 1 / alpha
    if kind == "x0":
        return torch.ones_like(sigma), torch.zeros_like(sigma)
    if kind == "v":
        n = alpha**2 + sigma**2
        return -sigma / n, alpha / n
    if kind == "flow":
        n = alpha + sigma
        return -sigma / n, 1 / n
    if kind == "edm":
        s = sigma / alpha
        c_skip = sigma_data**2 / (s**2 + sigma_data**2)
        c_out = s * sigma_data / (s**2 + sigma_data**2).sqrt()
        return c_out, c_skip / alpha
    raise ValueError(f"unknown parameterization {kind!r}; choose one of {', '.join(PARAMETERIZATIONS)}")


def input_scale(kind: str, alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """Factor applied to x_t before the network: EDM's c_in = 1/sqrt(sigma_e^2 + sigma_data^2) on x_t/alpha
    (Karras et al. 2022, Table 1); 1 for the other parameterisations."""
    if kind == "edm":
        s = sigma / alpha
        return 1 / (alpha * (s**2 + sigma_data**2).sqrt())
    return torch.ones_like(sigma)


def to_x0(y: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, kind: str, sigma_data: float = 0.5) -> Tensor:
    """Raw output y [B, ...] of parameterisation `kind` -> x0 [B, ...]; alpha, sigma broadcast to x_t."""
    a, b = x0_coefficients(kind, alpha, sigma, sigma_data)
    return a * y + b * x_t


def from_x0(x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, kind: str, sigma_data: float = 0.5) -> Tensor:
    """Inverse of `to_x0`: the raw output of parameterisation `kind` whose x0 is `x0`."""
    a, b = x0_coefficients(kind, alpha, sigma, sigma_data)
    return (x0 - b * x_t) / a


@dataclass
class Prediction:
    """A denoiser output at (x_t, alpha, sigma), readable in every parameterisation.

    x_t, x0, eps: [B, C, H, W]; alpha, sigma: broadcastable to x_t ([B, 1, 1, 1]).
    `eps` normally equals (x_t - alpha x0) / sigma; CFG++ overrides it with the unconditional eps used
    for re-noising (Chung et al. 2025), which is why it is stored rather than derived.
    """

    x_t: Tensor
    alpha: Tensor
    sigma: Tensor
    x0: Tensor
    eps: Tensor

    @classmethod
    def from_raw(cls, y: Tensor, kind: str, x_t: Tensor, alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5):
        return cls.from_x0(to_x0(y, x_t, alpha, sigma, kind, sigma_data), x_t, alpha, sigma)

    @classmethod
    def from_x0(cls, x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor):
        return cls(x_t=x_t, alpha=alpha, sigma=sigma, x0=x0, eps=(x_t - alpha * x0) / sigma)

    @classmethod
    def from_space(cls, y: Tensor, space: str, like: "Prediction"):
        """Build from a value in `space` (eps, x0, v, flow) at the same (x_t, alpha, sigma) as `like`."""
        return cls.from_raw(y, space, like.x_t, like.alpha, like.sigma)

    def read(self, space: str, sigma_data: float = 0.5) -> Tensor:
        """This prediction's x0 expressed in `space` (eps, x0, v, flow, edm)."""
        if space == "x0":
            return self.x0
        return from_x0(self.x0, self.x_t, self.alpha, self.sigma, space, sigma_data)

    def with_eps(self, eps: Tensor) -> "Prediction":
        return replace(self, eps=eps)


def raw_target(kind: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """The raw output a perfect network of parameterisation `kind` gives for x_t = alpha x0 + sigma eps.

    eps -> eps; x0 -> x0; v -> alpha eps - sigma x0 (Salimans & Ho 2022, sec. 4); flow -> eps - x0
    (Liu et al. 2022); edm -> (x0 - c_skip x) / c_out (Karras et al. 2022, Eq. 8). Computed directly,
    not through x_t, so it stays exact at small sigma.
    """
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return alpha * eps - sigma * x0
    if kind == "flow":
        return eps - x0
    if kind == "edm":
        x_t = alpha * x0 + sigma * eps
        return from_x0(x0, x_t, alpha, sigma, kind, sigma_data)
    raise ValueError(f"unknown parameterization {kind!r}; choose one of {', '.join(PARAMETERIZATIONS)}")
