"""A Gaussian-mixture data distribution with closed-form denoisers, and an exact "network" for it.

x0 ~ sum_k pi_k N(mu_k, s_k^2 I) in d = prod(shape) dims; component k belongs to class classes[k].
For x_t = alpha x0 + sigma eps, x_t | k ~ N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I), so

    p(k | x_t, y) ∝ pi_k N(x_t; alpha mu_k, v_k I) [classes[k] = y],   v_k = alpha^2 s_k^2 + sigma^2,
    E[x0 | x_t, k] = mu_k + alpha s_k^2 / v_k (x_t - alpha mu_k),
    E[x0 | x_t, y] = sum_k p(k | x_t, y) E[x0 | x_t, k]      (y = -1: the unconditional mixture),
    log p(y | x_t) = logsumexp_{k in y} log(pi_k N(...)) - logsumexp_k log(pi_k N(...)).

`GMMNet` returns the exact raw output of any parameterisation (eps/x0/v/flow/edm) for these posterior
means, so guiders can be checked against analytic combinations. Reusable by other tests:

    from tests.guidance.gmm import GaussianMixture, GMMNet, gmm_denoiser
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from guidance.denoiser import Denoiser
from guidance.parameterization import from_x0, input_scale
from guidance.schedules import Schedule


def _col(v: Tensor, like: Tensor) -> Tensor:
    """[B] (or scalar) -> [B, 1] in like's dtype."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.reshape(-1, 1) if v.ndim else v


class GaussianMixture:
    """Isotropic Gaussian mixture over images of `shape`, with class labels per component.

    means [K, d]; stds [K]; weights [K] (summing to 1); classes [K] long in 0..num_classes-1.
    """

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor, classes: Tensor, shape: tuple[int, ...]):
        self.means, self.stds, self.weights, self.classes = means, stds, weights / weights.sum(), classes.long()
        self.shape = tuple(shape)
        self.num_classes = int(self.classes.max()) + 1

    @classmethod
    def random(cls, num_classes: int = 3, per_class: int = 2, shape: tuple[int, ...] = (2, 3, 3), seed: int = 0,
               spread: float = 1.5, dtype: torch.dtype = torch.float64) -> "GaussianMixture":
        """Random means ~ N(0, spread^2), stds in [0.3, 0.8], Dirichlet-like weights."""
        g = torch.Generator().manual_seed(seed)
        k, d = num_classes * per_class, math.prod(shape)
        means = spread * torch.randn(k, d, generator=g, dtype=dtype)
        stds = 0.3 + 0.5 * torch.rand(k, generator=g, dtype=dtype)
        weights = 0.5 + torch.rand(k, generator=g, dtype=dtype)
        classes = torch.arange(num_classes).repeat_interleave(per_class)
        return cls(means, stds, weights, classes, shape)

    def widened(self, factor: float) -> "GaussianMixture":
        """The same mixture with every std times `factor` (a "weaker", blurrier model)."""
        return GaussianMixture(self.means, self.stds * factor, self.weights, self.classes, self.shape)

    def _log_joint(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """log pi_k + log N(x; alpha mu_k, v_k I): x [B, d], alpha, sigma [B] -> [B, K]."""
        a, s = _col(alpha, x), _col(sigma, x)
        mu, std = self.means.to(x), self.stds.to(x)
        v = a**2 * std**2 + s**2  # [B, K]
        sq = ((x[:, None, :] - a[:, :, None] * mu[None]) ** 2).sum(-1)
        d = x.shape[1]
        return torch.log(self.weights.to(x)) - 0.5 * sq / v - 0.5 * d * torch.log(2 * math.pi * v)

    def _mask(self, labels: Tensor | None, b: int, device) -> Tensor:
        """[B, K] bool: components allowed for each sample (all of them for label -1 or None)."""
        classes = self.classes.to(device)
        if labels is None:
            return torch.ones(b, classes.shape[0], dtype=torch.bool, device=device)
        labels = labels.long().reshape(-1, 1).to(device)
        return (labels < 0) | (classes[None] == labels)

    def posterior_mean(self, x_t: Tensor, alpha: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        """E[x0 | x_t, y]: x_t [B, *shape]; alpha, sigma [B] or scalars; labels [B] (-1 = unconditional)."""
        b = x_t.shape[0]
        x = x_t.reshape(b, -1)
        a, s = _col(alpha, x), _col(sigma, x)
        logj = self._log_joint(x, alpha, sigma).masked_fill(~self._mask(labels, b, x.device), -math.inf)
        resp = torch.softmax(logj, dim=1)  # [B, K]
        mu, var = self.means.to(x), self.stds.to(x) ** 2
        v = a**2 * var + s**2  # [B, K]
        gain = (a * var / v)[:, :, None]  # [B, K, 1]
        comp = mu[None] + gain * (x[:, None, :] - a[:, :, None] * mu[None])  # [B, K, d]
        return (resp[:, :, None] * comp).sum(1).reshape(x_t.shape)

    def class_log_probs(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """log p(y | x_t) for every class: x_t [B, *shape] -> [B, num_classes] (normalised)."""
        x = x_t.reshape(x_t.shape[0], -1)
        logj = self._log_joint(x, alpha, sigma)
        per_class = torch.stack([torch.logsumexp(logj[:, self.classes.to(x.device) == c], dim=1)
                                 for c in range(self.num_classes)], dim=1)
        return per_class - torch.logsumexp(per_class, dim=1, keepdim=True)

    def noisy_classifier(self, schedule: Schedule) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """The exact noisy classifier(x_t, t, labels) -> logits [B, num_classes] under `schedule`."""
        def classify(x_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
            a, s = schedule.alpha_sigma(t.to(x_t.dtype))
            return self.class_log_probs(x_t, a, s)
        return classify

    def clean_classifier(self) -> Callable[[Tensor], Tensor]:
        """The exact classifier on clean data, classifier(x0) -> logits [B, num_classes]."""
        def classify(x0: Tensor) -> Tensor:
            one = torch.ones(x0.shape[0], dtype=x0.dtype, device=x0.device)
            return self.class_log_probs(x0, one, torch.zeros_like(one))
        return classify

    def sample(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x0 [B, *shape] drawn from the class-conditional mixtures of `labels` [B]."""
        mask = self._mask(labels, labels.shape[0], self.means.device)
        probs = self.weights[None].expand(labels.shape[0], -1) * mask
        k = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        z = torch.randn(labels.shape[0], self.means.shape[1], generator=generator, dtype=self.means.dtype)
        return (self.means[k] + self.stds[k, None] * z).reshape(labels.shape[0], *self.shape)


class GMMNet(nn.Module):
    """An exact "network" for a GaussianMixture: net(x_in, net_time, cond) -> raw output.

    Inverts the Denoiser's input scaling and time map (t = net_time / schedule.time_scale), computes the
    closed-form posterior mean and returns it in `parameterization` (eps, x0, v, flow, edm). cond: labels
    [B] long with -1 = null. `perturb="pag"` answers with the `perturbed` mixture (default: stds x 1.5),
    standing in for a perturbed-attention pass. `calls` records (batch size, perturb) per forward.
    """

    def __init__(self, gmm: GaussianMixture, schedule: Schedule, parameterization: str = "eps",
                 sigma_data: float = 0.5, perturbed: GaussianMixture | None = None):
        super().__init__()
        self.gmm, self.schedule, self.parameterization, self.sigma_data = gmm, schedule, parameterization, sigma_data
        self.perturbed = gmm.widened(1.5) if perturbed is None else perturbed
        self.calls: list[tuple[int, str | None]] = []

    def forward(self, x_in: Tensor, net_time: Tensor, cond: Tensor, perturb: str | None = None) -> Tensor:
        self.calls.append((x_in.shape[0], perturb))
        if perturb not in (None, "pag"):
            raise ValueError(f"GMMNet supports perturb=None or 'pag', got {perturb!r}")
        t = torch.as_tensor(net_time, dtype=x_in.dtype) / self.schedule.time_scale
        t = t.expand(x_in.shape[0]) if t.ndim == 0 else t
        alpha, sigma = self.schedule.alpha_sigma(t)
        shape = (-1,) + (1,) * (x_in.ndim - 1)
        a, s = alpha.reshape(shape), sigma.reshape(shape)
        x_t = x_in / input_scale(self.parameterization, a, s, self.sigma_data)
        gmm = self.perturbed if perturb == "pag" else self.gmm
        x0 = gmm.posterior_mean(x_t, alpha, sigma, cond)
        return from_x0(x0, x_t, a, s, self.parameterization, self.sigma_data)

    def null_cond(self, cond: Tensor) -> Tensor:
        return torch.full_like(cond, -1)


def gmm_denoiser(gmm: GaussianMixture, schedule: Schedule, parameterization: str = "eps", **net_kwargs) -> Denoiser:
    """Denoiser(GMMNet(...)) whose predictions are the closed-form posterior means."""
    return Denoiser(GMMNet(gmm, schedule, parameterization, **net_kwargs), schedule, parameterization)
