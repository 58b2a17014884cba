"""How a trained method samples: its recipe, used by `generate`, the CLI and export.

- GuidedSampling: a guided sampler over the model (teacher, erased model): any guider, sampler, step count, scale,
  DDIM eta and negative condition;
- WInputSampling: a guidance-distilled student that takes w as an input (one evaluation per step); progressive
  students are distilled to a fixed DDIM step count;
- GeneratorSampling: a one- or few-step generator that runs its own times; guidance was distilled into it.

`resolve` fills in the recipe's defaults and refuses, with one line saying what to do, a request it cannot
honour (a guidance scale for a one-step generator, 8 steps of a student distilled to 4, a negative prompt for a
model with no unconditional branch), so nothing a user asks for is silently ignored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from guidance.denoiser import Denoiser
from guidance.guided import GuidedDenoiser
from guidance.guiders import Guider, build_guider
from guidance.noise import standard_normal
from guidance.samplers import check_sampler, sample
from losses.consistency import consistency_output, lcm_inference_indices, solver_grid

DEFAULT_STEPS = 50    # sampler steps for models without a step count of their own
DEFAULT_SCALE = 2.0   # guidance scale w when none is given (D_u + w (D_c - D_u))
MAX_SCALE = 100.0     # |w| beyond this is refused as a mistake


@dataclass
class Settings:
    """One sampling request, resolved: what `run` uses and what the CLI reports."""

    scale: float | None = None
    steps: int = DEFAULT_STEPS
    sampler: str = "ddim"
    guider: str | Guider = "cfg"
    guider_params: dict = field(default_factory=dict)
    eta: float = 0.0


def check_scale(scale: float) -> float:
    scale = float(scale)
    if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
        raise ValueError(f"guidance scale {scale} is not a usable w; give a finite value with |w| <= {MAX_SCALE:g} "
                         f"(w = 1: conditional, 0: unconditional)")
    return scale


def check_eta(eta: float) -> float:
    eta = float(eta)
    if not math.isfinite(eta) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"DDIM eta must be in [0, 1] (0 deterministic, 1 ancestral), got {eta}")
    return eta


class Recipe:
    """A method's way of sampling (see the module docstring)."""

    name = ""

    def resolve(self, scale=None, steps=None, sampler=None, guider=None, guider_params=None, eta=0.0,
                negative: bool = False) -> Settings:
        raise NotImplementedError

    def run(self, noise: Tensor, cond: Any, neg: Any, settings: Settings, generator: torch.Generator,
            progress: bool = False) -> tuple[Tensor, float]:
        """Samples [B, C, H, W] from unit noise [B, C, H, W] and network evaluations per sample."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What an export records: the recipe, default steps and evaluations per step."""
        raise NotImplementedError


class GuidedSampling(Recipe):
    """A guided sampler over `denoiser()` (guidance.samplers.sample with a guider of guidance.guiders).

    denoiser:      returns the Denoiser to sample (the EMA network when there is one).
    default_steps: steps when none are asked for.
    weak:          returns the weak model of autoguidance, or None.
    """

    name = "cfg"

    def __init__(self, denoiser: Callable[[], Denoiser], default_steps: int = DEFAULT_STEPS,
                 weak: Callable[[], Denoiser | None] = lambda: None):
        self.denoiser, self.default_steps, self.weak = denoiser, default_steps, weak

    def resolve(self, scale=None, steps=None, sampler=None, guider=None, guider_params=None, eta=0.0,
                negative: bool = False) -> Settings:
        params = dict(guider_params or {})
        g = guider or "cfg"
        if isinstance(g, str):
            build_guider(g, **params)  # unknown names and parameters: a message listing what exists
        sampler, steps = sampler or "ddim", self.default_steps if steps is None else steps
        check_sampler(sampler, steps)  # unknown sampler, non-positive steps: a message saying what exists
        return Settings(check_scale(DEFAULT_SCALE if scale is None else scale), steps, sampler, g, params,
                        check_eta(eta))

    def guided(self, s: Settings) -> GuidedDenoiser:
        g = build_guider(s.guider, **s.guider_params) if isinstance(s.guider, str) else s.guider
        return GuidedDenoiser(self.denoiser(), g, self.weak())

    def run(self, noise, cond, neg, s: Settings, generator, progress=False):
        guided = self.guided(s).to(noise.device)  # a weak model given to the recipe: on the sampling device
        guided.guider.to(noise.device)  # a guider's own networks (classifier guidance's classifier, GFCG's)
        x = sample(guided, noise, cond, s.scale, s.steps, s.sampler, eta=s.eta, neg_cond=neg, generator=generator,
                   progress=progress)
        return x, guided.nfe

    def describe(self) -> dict:
        return {"recipe": "cfg", "steps": self.default_steps, "evaluations_per_step": 2}


class WInputSampling(GuidedSampling):
    """A w-conditioned student (models.w_embedding): w is its input and each step is ONE network evaluation,
    whatever guider it was distilled from.

    distilled_guider: the guider the student learned; "conditional", "cfg" and this name all mean "the student".
    fixed_steps:      the DDIM step count a progressive student was distilled to (None: any sampler and count).
    """

    name = "w_input"

    def __init__(self, denoiser: Callable[[], Denoiser], distilled_guider: str = "cfg", fixed_steps: int | None = None):
        super().__init__(denoiser, fixed_steps or DEFAULT_STEPS)
        self.distilled_guider, self.fixed_steps = distilled_guider, fixed_steps

    def resolve(self, scale=None, steps=None, sampler=None, guider=None, guider_params=None, eta=0.0,
                negative: bool = False) -> Settings:
        name = guider.name if isinstance(guider, Guider) else guider
        if name not in (None, "conditional", "cfg", self.distilled_guider) or guider_params:
            raise ValueError(f"this is a guidance-distilled student (distilled from guider {self.distilled_guider!r}): "
                             f"it takes w as input and runs one network evaluation per step; sample it with "
                             f"--guider {self.distilled_guider} (or conditional) and no --param")
        if negative:
            raise ValueError("a guidance-distilled student has no unconditional branch for a negative condition to "
                             "replace; sample its teacher with the negative prompt instead, or add --nasa-scale "
                             "ALPHA (NASA: the negative prompt in the cross-attention layers of a text UNet)")
        if self.fixed_steps is not None:
            if steps not in (None, self.fixed_steps):
                raise ValueError(f"this progressive student was distilled to {self.fixed_steps} DDIM steps; sample it "
                                 f"with --steps {self.fixed_steps} (or leave --steps out)")
            if sampler not in (None, "ddim"):
                raise ValueError(f"this progressive student was distilled to DDIM steps; sample it with --sampler ddim, "
                                 f"not {sampler!r}")
        sampler, steps = sampler or "ddim", self.default_steps if steps is None else steps
        check_sampler(sampler, steps)
        return Settings(check_scale(DEFAULT_SCALE if scale is None else scale), steps, sampler, "conditional", {},
                        check_eta(eta))

    def guided(self, s: Settings) -> GuidedDenoiser:
        from models.w_embedding import WInputGuided

        return WInputGuided(self.denoiser())

    def describe(self) -> dict:
        return {"recipe": "w_input", "steps": self.default_steps, "distilled": self.fixed_steps is not None,
                "evaluations_per_step": 1}


class GeneratorSampling(Recipe):
    """A one- or few-step generator (train.methods.onestep): its own times, one evaluation per step; the guidance
    scale it was distilled at is part of it.

    run_generator: (noise [B, C, H, W], cond, torch.Generator) -> x0 samples.
    steps:         its step count k; scale: the scale it was distilled at (None for a range, PG-SB).
    """

    name = "generator"

    def __init__(self, run_generator: Callable, steps: int, scale: float | None):
        self.run_generator, self.steps, self.scale = run_generator, steps, scale

    def resolve(self, scale=None, steps=None, sampler=None, guider=None, guider_params=None, eta=0.0,
                negative: bool = False) -> Settings:
        asked = {"--scale": scale is not None and (self.scale is None or float(scale) != self.scale),
                 "--steps": steps is not None and steps != self.steps, "--sampler": sampler not in (None, "generator"),
                 "--guider": guider is not None or bool(guider_params), "--eta": bool(eta),
                 "--negative-prompt": negative}
        bad = [k for k, v in asked.items() if v]
        if bad:
            scale_note = f" at w = {self.scale:g}" if self.scale is not None else " over a range of w (PG-SB)"
            raise ValueError(f"this is a {self.steps}-step generator distilled{scale_note}: it samples with its own "
                             f"times and guidance, so {', '.join(bad)} cannot be honoured; leave "
                             f"{'it' if len(bad) == 1 else 'them'} out"
                             + (" (a negative prompt works with --nasa-scale ALPHA on text UNets: NASA)" if negative
                                else ""))
        return Settings(self.scale, self.steps, "generator", "conditional", {}, 0.0)

    def run(self, noise, cond, neg, s: Settings, generator, progress=False):
        return self.run_generator(noise, cond, generator), float(self.steps)

    def describe(self) -> dict:
        return {"recipe": "generator", "steps": self.steps, "evaluations_per_step": 1}


class ConsistencySampling(Recipe):
    """A latent consistency model (train.methods.consistency): multistep consistency sampling (Song et al. 2023,
    arXiv 2303.01469, Algorithm 1), LCM's sampler and diffusers' LCMScheduler: at each chosen time t_j the model's
    consistency output f(x, t_j) = c_skip x + c_out x0_hat (losses.consistency) is the sample; before the next time it
    is re-noised with fresh noise, x = alpha(t_{j+1}) f + sigma(t_{j+1}) z. The times are those LCMScheduler picks on
    the N-point solver grid (losses.consistency.lcm_inference_indices); one network evaluation per step.

    denoiser:      returns the Denoiser of the consistency model.
    solver_steps:  N, the solver grid it was distilled on (steps may be 1 .. N).
    default_steps: steps when none are asked for (LCM: 4).
    w_input:       the model takes the guidance scale w as an input (then `scale` is honoured, default
                   default_scale); otherwise the guidance it was distilled with is part of it and --scale is refused.
    scale_range:   (w_min, w_max) it was distilled over, reported in messages and exports.
    """

    name = "consistency"

    def __init__(self, denoiser: Callable[[], Denoiser], solver_steps: int, default_steps: int = 4,
                 w_input: bool = True, default_scale: float = DEFAULT_SCALE,
                 scale_range: tuple[float, float] | None = None, timestep_scaling: float = 10.0):
        self.denoiser, self.solver_steps, self.default_steps = denoiser, solver_steps, default_steps
        self.w_input, self.default_scale, self.scale_range = w_input, default_scale, scale_range
        self.timestep_scaling = timestep_scaling

    def resolve(self, scale=None, steps=None, sampler=None, guider=None, guider_params=None, eta=0.0,
                negative: bool = False) -> Settings:
        name = guider.name if isinstance(guider, Guider) else guider
        asked = {"--sampler": sampler not in (None, "consistency", "lcm"),
                 "--guider": name not in (None, "conditional", "cfg") or bool(guider_params), "--eta": bool(eta),
                 "--negative-prompt": negative, "--scale": scale is not None and not self.w_input}
        bad = [k for k, v in asked.items() if v]
        if bad:
            lo, hi = self.scale_range or (None, None)
            scale_note = (f"takes w as an input (--scale)" if self.w_input else
                          f"holds the guidance it was distilled with (w in [{lo:g}, {hi:g}])" if lo is not None else
                          "holds the guidance it was distilled with")
            raise ValueError(f"this is a latent consistency model: it samples with its own multistep consistency "
                             f"sampler (1 to {self.solver_steps} steps, one evaluation each) and {scale_note}, so "
                             f"{', '.join(bad)} cannot be honoured; leave {'it' if len(bad) == 1 else 'them'} out"
                             + (" (a negative prompt works with --nasa-scale ALPHA on text UNets: NASA)" if negative
                                else ""))
        steps = self.default_steps if steps is None else steps
        lcm_inference_indices(self.solver_steps, steps)  # 1 <= steps <= N, else the one-line error
        w = check_scale(self.default_scale if scale is None else scale) if self.w_input else None
        return Settings(w, steps, "consistency", "conditional", {}, 0.0)

    def times(self, steps: int, device=None) -> Tensor:
        """The `steps` times [steps] (float64) the sampler visits, descending (LCMScheduler's timesteps)."""
        grid, _ = solver_grid(self.denoiser().schedule, self.solver_steps, device)
        return grid[lcm_inference_indices(self.solver_steps, steps)]

    def run(self, noise, cond, neg, s: Settings, generator, progress=False):
        den = self.denoiser()
        sched, b = den.schedule, noise.shape[0]
        times = self.times(s.steps, noise.device).to(noise.dtype)
        if self.w_input:
            cond = {"cond": cond, "w": torch.full((b,), float(s.scale), device=noise.device)}
        a0, s0 = sched.alpha_sigma(times[:1])
        x = noise * (a0**2 + s0**2).sqrt()  # the prior at t_max for unit-variance data, as `sample`
        with torch.no_grad():
            for j in range(len(times)):
                t = times[j].expand(b)
                x0 = consistency_output(x, den(x, t, cond).x0, t, sched, self.timestep_scaling)
                if j + 1 == len(times):
                    x = x0
                else:  # fresh noise from the request's generator (CPU), as LCMScheduler.step draws it
                    z = standard_normal(x.shape, generator, x.device, x.dtype)
                    x = sched.add_noise(x0, z, times[j + 1].expand(b))
        return x, float(len(times))

    def describe(self) -> dict:
        return {"recipe": "consistency", "steps": self.default_steps, "solver_steps": self.solver_steps,
                "timestep_scaling": self.timestep_scaling, "w_input": self.w_input,
                "scale_range": list(self.scale_range) if self.scale_range else None, "evaluations_per_step": 1}
