"""OneStepDistillation's Decoupled DMD objective (Liu et al. 2025, arXiv 2511.22677): the generator loss with CFG
augmentation and distribution matching re-noised apart, and the check of its re-noising times."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from guidance.conditions import cond_cat
from losses.dmd import decoupled_dmd_loss
from train.methods.onestep_config import ObjectiveArgs


class DecoupledDMDObjective:
    """Mixin of train.methods.onestep.OneStepDistillation (it provides objective, generator, fake_score, ca_t_range,
    dm_t_range, _uniform_t and MethodModule's noise_like). Decoupled DMD needs guider cfg
    (onestep_config.check_combinations)."""

    def _decoupled_loss(self, x: Tensor, labels: Tensor, w: Tensor, t_gen: float) -> Tensor:
        """Decoupled DMD's loss [B] for generator samples x made from inputs at time t_gen (arXiv 2511.22677, Eq. 8),
        CA and DM re-noised at times drawn as objective.renoise says (sec. 4.3: hybrid = CA times cleaner than t_gen,
        DM times over dm_t_range)."""
        b, dev, sched, teacher = x.shape[0], x.device, self.generator.schedule, self.fake_score.teacher
        schedule = self.objective.renoise_schedule
        t_ca = self._uniform_t(b, self.ca_t_range, dev, below=None if schedule == "full" else t_gen)
        t_dm = self._uniform_t(b, self.dm_t_range, dev, below=t_gen if schedule == "constrained" else None)
        x_ca = sched.add_noise(x.detach(), self.noise_like(x), t_ca)
        x_dm = sched.add_noise(x.detach(), self.noise_like(x), t_dm)
        with torch.no_grad():
            both = teacher(torch.cat([x_ca, x_ca]), torch.cat([t_ca, t_ca]), cond_cat([labels, teacher.null_cond(labels)])).x0
            d_fake = self.fake_score(x_dm, t_dm, labels).x0
            d_cond = teacher(x_dm, t_dm, labels).x0
        return decoupled_dmd_loss(x, both[:b], both[b:], w, d_fake, d_cond, self.objective.ca_weight,
                                  self.objective.dm_weight)


def check_renoise_times(objective: ObjectiveArgs, generator_times: Sequence[float]) -> None:
    """Decoupled DMD's hybrid / constrained schedules draw CA (and, constrained, DM) times cleaner than each generator
    step's input time t_j: every t_j must lie above the range's lo."""
    names = {"hybrid": ("ca_t",), "constrained": ("ca_t", "dm_t"), "full": ()}[objective.renoise_schedule]
    for name in names:
        lo = objective.times(name)[0]
        low = [t for t in generator_times if t <= lo]
        if low:
            raise ValueError(f"objective.renoise {objective.renoise_schedule} draws {name.replace('_t', '')} times in "
                             f"[{lo}, t_j) below each generator step's time t_j, but step time {low[0]} is not above "
                             f"{lo}; lower objective.{name}_range's lo, raise generator.times, or set renoise: full")
