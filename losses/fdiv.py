"""f-distill: f-divergence weights h(r) = r^2 f''(r) on the DMD gradient, with the density ratio
r = p_teacher / q_student read from a discriminator logit (Xu et al. 2025, arXiv 2502.15681).

Derivation (their Theorem 1, in our words): for D_f(p_t || q_t) = E_{q_t}[f(r)], r = p_t / q_t and a
reparameterised x_t(theta),

    grad_theta D_f = E[ h(r(x_t)) (s_q(x_t) - s_p(x_t)) . dx_t/dtheta ],   h(r) = r^2 f''(r),

so h = 1 (f = -log r, reverse KL) is VSD/DMD and every other divergence reweights the same
per-sample score difference. Constants in h are immaterial: the weights are divided by their batch mean.

Normalisation (f-distill's two stages, as its authors' code does it: NVlabs FastGen,
fastgen/methods/distribution_matching/f_distill.py `_get_f_div_weighting_h`, FdistillConfig bin_num 10,
ratio_ema_rate 0.0 by default and 0.5 in its ImageNet-64 config): r = exp(clamp(logit, -10, 10)) clamped to
[0.1, 20]; (1) r is divided by a running mean of r in its time bin (`ratio_bins` equal-width bins of t; per bin an
EMA, updated before use from the global batch, only in bins that hold samples); (2) h of the normalised r is
divided by its global-batch mean (`two_stage_weights`). `normalize_weights` keeps the earlier one-stage
variants: h / its batch mean, or h / its per-time-bin batch mean.
The f's and their exact h:

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
NORM_EPS = 1e-6  # the authors' guard in both divisions of the two-stage normalisation


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
        return time_bin(v, time_bins)

    bins_all = bin_of(t_all)
    sums = torch.zeros(time_bins, dtype=h.dtype, device=h.device).index_add_(0, bins_all, h_all)
    counts = torch.zeros(time_bins, dtype=h.dtype, device=h.device).index_add_(0, bins_all, torch.ones_like(h_all))
    return h / (sums / counts.clamp(min=1))[bin_of(t)]


def time_bin(t: Tensor, bins: int) -> Tensor:
    """Index [B] (long) of t's equal-width bin of [0, 1] (the schedule's time range), t = 1 in the last bin."""
    return (t.detach().clamp(0, 1) * bins).long().clamp(max=bins - 1)


def update_ratio_ema(ema: Tensor, r: Tensor, t: Tensor, rate: float) -> Tensor:
    """The per-time-bin running mean of the density ratio after one batch (f-distill's first stage, FastGen
    `_get_f_div_weighting_h`): for every bin b holding samples of the batch, ema_b <- rate ema_b + (1 - rate) mean
    of r over them; empty bins keep their value.

    ema: [bins] (float32 state, e.g. a module buffer, initially ones); r, t: [N] of the WHOLE (global) batch.
    rate: 0 replaces each visited bin by the batch's mean. Returns a new [bins] tensor (ema is not modified)."""
    bins = ema.numel()
    idx = time_bin(t, bins)
    counts = torch.zeros(bins, dtype=torch.float64, device=r.device).index_add_(0, idx, torch.ones_like(r, dtype=torch.float64))
    sums = torch.zeros(bins, dtype=torch.float64, device=r.device).index_add_(0, idx, r.detach().double())
    visited = counts > 0
    mean = sums / counts.clamp(min=1)
    out = ema.detach().double().clone()
    out[visited] = rate * out[visited] + (1 - rate) * mean[visited]
    return out.to(ema.dtype)


def two_stage_weights(name: str, logits: Tensor, t: Tensor, ema: Tensor, rate: float,
                      gather: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """f-distill's weights with its two-stage normalisation (Xu et al. 2025, arXiv 2502.15681, and the
    authors' code, FastGen f_distill.py): r = density_ratio(logits); the per-bin running mean of r is updated with
    this global batch (`update_ratio_ema`); r_n = r / (ema[bin(t)] + 1e-6); h = f_weight(name, r_n);
    weights = h / (mean of h over the global batch + 1e-6).

    logits, t: [B] of this process; ema: [bins] state (see update_ratio_ema); rate: its EMA rate.
    gather: maps a per-process [B, ...] tensor to the global batch's (MethodModule.global_batch), so the bin means,
    the EMA and the batch mean are those one process would compute on the whole batch.
    Returns (weights [B] float32-or-wider, detached; the updated ema [bins], which the caller stores)."""
    r = density_ratio(logits)
    pair = torch.stack([r, t.detach().to(r.dtype)], dim=1)
    pair_all = pair if gather is None else gather(pair)
    r_all, t_all = pair_all[:, 0], pair_all[:, 1]
    new_ema = update_ratio_ema(ema, r_all, t_all, rate)
    scale = new_ema.to(r.dtype) + NORM_EPS
    h = f_weight(name, r / scale[time_bin(t, ema.numel())])
    h_all = f_weight(name, r_all / scale[time_bin(t_all, ema.numel())])
    return h / (h_all.mean() + NORM_EPS), new_ema


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
           "fdistill_weights", "fdistill_loss", "time_bin", "update_ratio_ema", "two_stage_weights"]
