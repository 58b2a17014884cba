"""Cached DDIM trajectories of a frozen guided model per request (class or prompt): the x_t of concept erasure's
`x_t_source: frozen_bank` (ESD samples the model being fine-tuned instead; this cache is the faster variant)."""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from guidance.guided import GuidedDenoiser
from guidance.samplers import ddim_step
from models.conditioning import Conditioner

PerSample = Callable[[Callable[[int], Tensor], int], Tensor]


def trajectory_seed(key: str, generation: int) -> int:
    """The start-noise seed of a request's trajectories: a stable digest of (key, generation), the same in every
    process and Python session (Python's str hash is salted per process)."""
    digest = hashlib.sha256(f"{key}\0{generation}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


class TrajectoryBank:
    """DDIM trajectories of a guided model per request, kept as the guided prediction (x0, eps) [N, S, C, H, W] at
    each of the S grid times. The state after a partial trajectory stopped at any t is one DDIM jump from the last
    grid state at or above t: x_t = alpha(t) x0_i + sigma(t) eps_i (Song et al. 2021, Eq. 12, eta = 0). ESD
    (Gandikota et al. 2023, sec. 4) samples the model being fine-tuned up to a random step every iteration; this
    bank is the cheaper stand-in that samples the FROZEN model once (x_t_source: frozen_bank), at t drawn from the
    schedule's training distribution (`draw`, as ESD's script draws a DDPM step inside the chosen DDIM interval) or at
    a grid step (`draw_at`). Memory: 2 N S C H W floats per request (0.7 MB per 100 digit trajectories).

    Banks are keyed by `conditioner.key(request)` and sampled with `conditioner.encode([request] * size)`. The
    trajectories of a request are a function of (key, `generation`) only (their start noise has its own seed,
    `trajectory_seed`), so a bank rebuilt after a restart, or first built during validation, is the same bank.

    guided: the frozen model under its guider (CFG); conditioner: its requests' encoder; shape: (C, H, W) of a
    sample; steps, scale, size: DDIM steps, guidance scale and trajectories per request; progress: show a bar while
    banks are built (a large model's bank takes minutes).
    """

    def __init__(self, guided: GuidedDenoiser, conditioner: Conditioner, shape: Sequence[int], steps: int = 50,
                 scale: float = 2.0, size: int = 128, progress: bool = False):
        self.guided, self.conditioner, self.shape = guided, conditioner, tuple(shape)
        self.steps, self.scale, self.size, self.progress = steps, scale, size, progress
        self.banks: dict[str, tuple[Tensor, Tensor]] = {}  # key -> (x0, eps) [N, S, C, H, W]
        self.generation = 0  # bumped (and the banks dropped) by the owner to draw fresh trajectories
        self.times: Tensor | None = None  # the S grid times, descending

    @torch.no_grad()
    def build(self, request: Any, device, bar: tqdm | None = None) -> None:
        """Sample `size` trajectories for `request` (the null request: unconditional) and store their predictions;
        bar: a progress bar advanced once per DDIM step (default: one of its own when `progress`)."""
        own = bar is None
        if own:
            bar = self._bar(1)
        try:
            with torch.inference_mode(False):  # a bank first built during validation must serve training too
                self._build(request, device, bar)
        finally:
            if own:
                bar.close()

    def _bar(self, requests: int) -> tqdm:
        return tqdm(total=requests * self.steps, desc=f"erasure trajectory bank ({requests} request(s) x {self.size})",
                    unit="step", disable=not self.progress, leave=False)

    def build_missing(self, requests: Sequence[Any], device) -> None:
        """Build the banks of the requests that have none, under one progress bar."""
        missing = {}
        for r in requests:
            missing.setdefault(self.conditioner.key(r), r)
        missing = {k: r for k, r in missing.items() if k not in self.banks}
        if not missing:
            return
        with self._bar(len(missing)) as bar:
            for r in missing.values():
                self.build(r, device, bar)

    def _build(self, request: Any, device, bar: tqdm) -> None:
        sched = self.guided.schedule
        times = sched.sampling_times(self.steps, device=device).float()
        a0, s0 = sched.alpha_sigma(times[:1])
        key = self.conditioner.key(request)
        noise = torch.Generator().manual_seed(trajectory_seed(key, self.generation))
        x = torch.randn(self.size, *self.shape, generator=noise).to(device) * (a0**2 + s0**2).sqrt()  # as samplers.sample
        cond = self.conditioner.encode([request] * self.size, device)
        x0s, epss = [], []
        for i in range(self.steps):
            t = times[i].expand(self.size)
            pred = self.guided(x, t, cond, self.scale)
            x0s.append(pred.x0.float())
            epss.append(pred.eps.float())
            t_next = times[i + 1].expand(self.size) if i + 1 < self.steps else torch.full_like(t, -1.0)
            x = ddim_step(pred, x, t_next, sched)
            bar.update(1)
        self.banks[key] = (torch.stack(x0s, 1), torch.stack(epss, 1))
        self.times = times

    def draw(self, requests: Sequence[Any], device, generator: torch.Generator | None = None,
             per_sample: PerSample | None = None) -> tuple[Tensor, Tensor]:
        """(x_t [B, C, H, W], t [B]) for B requests, building missing banks first.

        per_sample(draw, n): how the per-sample draws (t, trajectory) are made (MethodModule.per_sample, so that
        W processes equal one); default draw(n)."""
        per_sample = per_sample or (lambda fn, n: fn(n))
        self.build_missing(requests, device)
        sched = self.guided.schedule
        n = len(requests)
        t = per_sample(lambda m: sched.sample_t(m, generator=generator), n).float().to(device)  # CPU draws: same on every device
        t = t.clamp(max=float(self.times[0]))
        step = ((self.times[None, :] >= t[:, None]).sum(1) - 1).clamp(min=0)
        return self._jump(requests, t, step, device, generator, per_sample), t

    def draw_at(self, requests: Sequence[Any], stop: int, device, generator: torch.Generator | None = None,
                per_sample: PerSample | None = None) -> tuple[Tensor, Tensor]:
        """(x_t [B, C, H, W], t [B]) for B requests: a stored trajectory's state after its first `stop` DDIM steps
        (0 <= stop < steps), i.e. at the grid time t = sampling_times(steps)[stop] (what guidance.samplers.sample_until
        returns there for the trajectory's noise). per_sample: as `draw`."""
        per_sample = per_sample or (lambda fn, n: fn(n))
        self.build_missing(requests, device)
        n = len(requests)
        t = self.times[stop].float().to(device).expand(n)
        step = torch.full((n,), stop, dtype=torch.long, device=device)
        return self._jump(requests, t, step, device, generator, per_sample), t

    def _jump(self, requests, t: Tensor, step: Tensor, device, generator, per_sample: PerSample) -> Tensor:
        """x_t [B, C, H, W] at times t [B] from grid step `step` [B] of a random stored trajectory per request."""
        keys = [self.conditioner.key(r) for r in requests]
        n = len(keys)
        traj = per_sample(lambda m: torch.randint(0, self.size, (m,), generator=generator), n).to(device)
        x0 = torch.empty(n, *self.shape, device=device)
        eps = torch.empty_like(x0)
        for k in dict.fromkeys(keys):
            m = torch.tensor([kk == k for kk in keys], device=device)
            bx0, beps = self.banks[k]
            x0[m], eps[m] = bx0[traj[m], step[m]], beps[traj[m], step[m]]
        a, s = (v.reshape(-1, *([1] * len(self.shape))) for v in self.guided.schedule.alpha_sigma(t))
        return a * x0 + s * eps  # DDIM jump to t (Song et al. 2021, Eq. 12, eta = 0)
