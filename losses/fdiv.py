"""f-distill: f-divergence weights h(r) = r^2 f''(r) on the DMD gradient, with the density ratio
r = p_teacher / q_student read from a discriminator logit (Xu et al. 2025, arXiv 2502.15681).

Derivation (their Theorem 1, in our words): for D_f(p_t || q_t) = E_{q_t}[f(r)], r = p_t / q_t and a
reparameterised x_t(theta),

    grad_theta D_f = E[ h(r(x_t)) (s_q(x_t) - s_p(x_t)) . dx_t/dtheta ],   h(r) = r^2 f''(r),

so h = 1 (f = -log r, reverse KL) is VSD/DMD and every other divergence reweights the same
per-sample score difference. Constants in h are immaterial: the weights are divided by their batch
mean (f-distill sec. 4.2, "normalisation"). The f's and their exact h:

| name                  | f(r)                                | h(r) = r^2 f''(r) |
|-----------------------|-------------------------------------|-------------------|
| reverse_kl            | -log r                              | 1                 |
| forward_kl            | r log r                             | r                 |
| jensen_shannon        | r log r - (1 + r) log((1 + r) / 2)  | r / (1 + r)       |
| squared_hellinger     | (sqrt(r) - 1)^2                     | sqrt(r) / 2       |
| jeffreys              | (r - 1) log r                       | 1 + r             |
| pearson               | (r - 1)^2                           | 2 r^2             |
| neyman                | (1 - r)^2 / r                       | 2 / r             |

Jensen-Shannon here is KL(p||m) + KL(q||m), m = (p + q)/2, i.e. twice the usual JS (which would give
h = r / (2 (1 + r))); squared Hellinger is int (sqrt p - sqrt q)^2 (twice the 1/2-normalised one).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from losses.dmd import dmd_loss

LOGIT_CLAMP = 10.0
RATIO_MIN, RATIO_MAX = 0.1, 20.0


def _f_reverse_kl(r): return -torch.log(r)
def _f_forward_kl(r): return r * torch.log(r)
def _f_js(r): return r * torch.log(r) - (1 + r) * torch.log((1 + r) / 2)
def _f_hellinger(r): return (torch.sqrt(r) - 1) ** 2
def _f_jeffreys(r): return (r - 1) * torch.log(r)
def _f_pearson(r): return (r - 1) ** 2
def _f_neyman(r): return (1 - r) ** 2 / r


# name -> (f(r), h(r) = r^2 f''(r))
DIVERGENCES: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "reverse_kl": (_f_reverse_kl, lambda r: torch.ones_like(r)),
    "forward_kl": (_f_forward_kl, lambda r: r),
    "jensen_shannon": (_f_js, lambda r: r / (1 + r)),
    "squared_hellinger": (_f_hellinger, lambda r: 0.5 * torch.sqrt(r)),
    "jeffreys": (_f_jeffreys, lambda r: 1 + r),
    "pearson": (_f_pearson, lambda r: 2 * r**2),
    "neyman": (_f_neyman, lambda r: 2 / r),
}


def check_divergence(name: str) -> str:
    if name not in DIVERGENCES:
        raise ValueError(f"unknown f-divergence {name!r}; choose one of {', '.join(DIVERGENCES)}")
    return name


def f_function(name: str) -> Callable[[Tensor], Tensor]:
    """f(r) of divergence `name` (D_f(p || q) = E_q[f(p / q)])."""
    return DIVERGENCES[check_divergence(name)][0]


def f_weight(name: str, r: Tensor) -> Tensor:
    """h(r) = r^2 f''(r) of divergence `name`, elementwise (un-normalised, constants as in the table)."""
    return DIVERGENCES[check_divergence(name)][1](r)


def density_ratio(logits: Tensor, logit_clamp: float = LOGIT_CLAMP, r_min: float = RATIO_MIN,
                  r_max: float = RATIO_MAX) -> Tensor:
    """r = p_teacher / q_student = exp(logit), logit clamped to [-10, 10] and r to [0.1, 20] (f-distill sec. 4.3).

    logits: [B] from a discriminator trained with real = teacher data, fake = generator samples (the
    optimal logit of `losses.gan.discriminator_loss` is log p/q). Detached, float32 or wider.
    """
    z = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))
    return torch.exp(z.clamp(-logit_clamp, logit_clamp)).clamp(r_min, r_max)


def normalize_weights(h: Tensor, t: Tensor | None = None, time_bins: int = 0,
                      gather: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """h / mean(h) over the batch, or, with time_bins > 0 and t [B] in [0, 1], over the samples of each
    of `time_bins` equal-width t bins (so every noise level keeps unit mean weight). h: [B] -> [B].

    gather: maps a per-process [B] tensor to the global batch's values (all processes' samples), so that
    the means are those of the global batch, as one process on the whole batch would compute them."""
    h_all = h if gather is None else gather(h)
    if time_bins <= 0 or t is None:
        return h / h_all.mean()
    t_all = t if gather is None else gather(t)

    def bin_of(v: Tensor) -> Tensor:
        return (v.detach().clamp(0, 1) * time_bins).long().clamp(max=time_bins - 1)

    bins_all = bin_of(t_all)
    sums = torch.zeros(time_bins, dtype=h.dtype, device=h.device).index_add_(0, bins_all, h_all)
    counts = torch.zeros(time_bins, dtype=h.dtype, device=h.device).index_add_(0, bins_all, torch.ones_like(h_all))
    return h / (sums / counts.clamp(min=1))[bin_of(t)]


def fdistill_weights(name: str, logits: Tensor, t: Tensor | None = None, time_bins: int = 0,
                     gather: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Normalised per-sample weights [B]: h(r(logits)) divided by its batch (or per-time-bin) mean."""
    return normalize_weights(f_weight(name, density_ratio(logits)), t, time_bins, gather)


def fdistill_loss(x: Tensor, d_real: Tensor, d_fake: Tensor, logits: Tensor, divergence: str = "jensen_shannon",
                  t: Tensor | None = None, time_bins: int = 0, gather: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """f-distill generator loss per sample [B]: the DMD loss with g weighted by normalised h(r).

    x, d_real, d_fake: [B, C, H, W] as in `losses.dmd.dmd_loss`; logits: discriminator logits [B] at the
    same (x_t, t); t: [B] for per-time-bin normalisation; gather: see `normalize_weights` (multi-process).
    reverse_kl gives exactly `dmd_loss`.
    """
    return dmd_loss(x, d_real, d_fake, weight=fdistill_weights(divergence, logits, t, time_bins, gather))


__all__ = ["DIVERGENCES", "check_divergence", "f_function", "f_weight", "density_ratio", "normalize_weights",
           "fdistill_weights", "fdistill_loss"]
