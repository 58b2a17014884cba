"""Where concept erasure's x_t come from: partial DDIM trajectories of the model being fine-tuned (ESD, the default),
the frozen model's cached trajectories, or data batches; ANT's one early and one late stage per step."""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from guidance.conditions import cond_cat, cond_index
from guidance.guided import GuidedDenoiser
from guidance.guiders import CFG
from guidance.samplers import sample_until

X_T_SOURCES = ("student", "frozen_bank")


class Group(NamedTuple):
    """The samples of one loss term: x_t [n, C, H, W], t [n], their requests (canonical) and condition [n]."""

    term: str
    x_t: Tensor
    t: Tensor
    requests: list
    cond: Any


class ErasureSamples:
    """The x_t of ConceptErasure's loss terms ('erase', 'anchor', 'uncond'; with ANT also 'erase_early' and
    'uncond_early'), mixed into the module (it supplies per_sample, conditioner, student, spec, the options and
    `_condition`, `_bank`).

    Step batches (data.steps.ErasureSteps), x_t_source "student" (ESD, Gandikota et al. 2023, arXiv 2303.07345, sec. 4
    and the authors' train-esd script): each step, the student (the network being fine-tuned, not its EMA) runs
    `stop` DDIM steps of its CFG sampler at `trajectory_scale`, conditioned on each sample's own request, from fresh
    noise (guidance.samplers.sample_until, no grad); stop is uniform in 0 .. trajectory_steps - 1, one per step (ESD
    draws one per iteration), and the targets are then read at that grid time t = sampling_times(steps)[stop].
    x_t_source "frozen_bank": the frozen model's cached trajectories (train.methods.trajectories.TrajectoryBank),
    jumped to t drawn from the schedule's training distribution: the faster variant this project used first.

    ANT (ant_steps = k; "Set You Straight", arXiv 2504.12782, and the authors' code): each step draws one early
    group (stop uniform in 0 .. k - 1, the first k steps from noise) and one late group (stop in k .. steps - 1) of
    erased requests from the same start noise; the unconditional term is read at both groups' x_t.

    Every random draw goes through per_sample, so W processes x batch_size equal one process x W batch_size.
    """

    # --- draws ---------------------------------------------------------------------------------------
    def _draw_erased(self, n: int, generator=None) -> list:
        """n erased requests: one for the whole step ("one", the same on every process) or one per sample ("all")."""
        erased = self.spec.erased
        if self.concept_sampling == "one":
            idx = torch.randint(0, len(erased), (1,), generator=generator).expand(n)
        else:
            idx = self.per_sample(lambda m: torch.randint(0, len(erased), (m,), generator=generator), n)
        return [erased[i][0] for i in idx.tolist()]

    def _draw_anchors(self, n: int, generator=None) -> list:
        """n anchor requests drawn uniformly, or [] when there is no anchor term."""
        anchors = self.spec.anchors
        if not anchors or self.anchor_weight <= 0:
            return []
        pick = self.per_sample(lambda m: torch.randint(0, len(anchors), (m,), generator=generator), n)
        return [anchors[i] for i in pick.tolist()]

    def _draw_stop(self, lo: int, hi: int, n: int, generator=None) -> int:
        """One grid step in lo .. hi - 1 for the whole global batch (its trajectories run together)."""
        return int(self.per_sample(lambda m: torch.randint(lo, hi, (1,), generator=generator).expand(m), n)[0])

    def _draw_noise(self, n: int, generator=None) -> Tensor:
        """Unit Gaussian start noise [n, C, H, W] (drawn on the CPU: the same on every device)."""
        shape = self.sample_shape()
        return self.per_sample(lambda m: torch.randn(m, *shape, generator=generator), n).to(self.device)

    # --- on-policy trajectories ---------------------------------------------------------------------------
    def student_trajectory(self, noise: Tensor, cond: Any, stop: int) -> tuple[Tensor, Tensor]:
        """(x_t [B, C, H, W], t [B]): the student's own CFG DDIM trajectory (Song et al. 2021, Eq. 12) at
        `trajectory_scale` from unit noise [B, C, H, W], after its first `stop` of `trajectory_steps` steps
        (guidance.samplers.sample_until; no grad). ESD sec. 4: x_t comes from the model being fine-tuned."""
        guided = GuidedDenoiser(self.student, CFG())
        return sample_until(guided, noise, cond, self.trajectory_scale, self.trajectory_steps, stop)

    def _trajectory_groups(self, wanted: list[tuple[str, list]], generator=None) -> list[Group]:
        """x_t of each (term, requests) from trajectories: the student's (one stop for all terms, one batched run)
        or the frozen bank's (each term its own t from the training distribution, as before)."""
        conds = [self._condition(reqs) for _, reqs in wanted]
        if self.x_t_source == "frozen_bank":
            bank = self._bank()
            return [Group(term, *bank.draw(reqs, self.device, generator, self.per_sample), reqs, c)
                    for (term, reqs), c in zip(wanted, conds)]
        n = len(wanted[0][1])
        stop = self._draw_stop(0, self.trajectory_steps, n, generator)
        noise = torch.cat([self._draw_noise(len(reqs), generator) for _, reqs in wanted])
        x_t, t = self.student_trajectory(noise, cond_cat(conds), stop)
        groups, i = [], 0
        for (term, reqs), c in zip(wanted, conds):
            groups.append(Group(term, x_t[i:i + len(reqs)], t[i:i + len(reqs)], reqs, c))
            i += len(reqs)
        return groups

    def _stage(self, requests: list, cond: Any, stop: int, noise: Tensor | None, generator=None) -> tuple[Tensor, Tensor]:
        """x_t, t of requests after `stop` grid steps: the student's trajectory from `noise`, or the frozen bank's."""
        if self.x_t_source == "frozen_bank":
            return self._bank().draw_at(requests, stop, self.device, generator, self.per_sample)
        return self.student_trajectory(noise, cond, stop)

    def _ant_groups(self, erased: list, anchors: list, generator=None) -> list[Group]:
        """ANT's groups: 'erase' (late stage), 'erase_early', 'anchor' (as without ANT), and the null condition at
        both stages' x_t ('uncond', 'uncond_early'; ANT keeps the unconditional prediction at every stage)."""
        n, k = len(erased), self.ant_steps
        early = self._draw_stop(0, k, n, generator)
        late = self._draw_stop(k, self.trajectory_steps, n, generator)
        cond = self._condition(erased)
        noise = self._draw_noise(n, generator) if self.x_t_source == "student" else None  # one start for both stages
        x_e, t_e = self._stage(erased, cond, early, noise, generator)
        x_l, t_l = self._stage(erased, cond, late, noise, generator)
        groups = [Group("erase", x_l, t_l, erased, cond), Group("erase_early", x_e, t_e, erased, cond)]
        if anchors:
            groups += self._trajectory_groups([("anchor", anchors)], generator)
        if self.uncond_weight > 0:
            nulls = [self.conditioner.null_request] * n
            null = self._condition(nulls)
            groups += [Group("uncond", x_l, t_l, nulls, null), Group("uncond_early", x_e, t_e, nulls, null)]
        return groups

    # --- every term's samples ------------------------------------------------------------------------
    def _groups(self, batch, generator=None) -> list[Group]:
        """The samples of each loss term: from trajectories (a step batch), or from real data when the batch is
        (samples [B, C, H, W], requests [B]: class ids or captions)."""
        if isinstance(batch, (list, tuple)):
            return self._data_groups(*batch, generator=generator)
        n = self.batch_size
        erased, anchors = self._draw_erased(n, generator), self._draw_anchors(n, generator)
        if self.ant_steps is not None:
            return self._ant_groups(erased, anchors, generator)
        wanted = [("erase", erased)] + ([("anchor", anchors)] if anchors else [])
        if self.uncond_weight > 0:
            wanted.append(("uncond", [self.conditioner.null_request] * n))
        return self._trajectory_groups(wanted, generator)

    def _data_groups(self, x0: Tensor, raw, generator=None) -> list[Group]:
        """A data batch: x_t = noised samples; a sample is "erase" when its request's key is an erased request (of the
        step's concept with "one"), "anchor" when it is an anchor; every sample also counts, with the null condition,
        for "uncond"."""
        if self.ant_steps is not None:
            raise ValueError("ant_steps draws x_t at grid steps of trajectories, which a data batch has not: train on "
                             "data.steps.ErasureSteps, or give t_window (ANT's window in t) for data batches")
        requests = self.conditioner.parse_all(raw)
        n, sched = len(requests), self.student.schedule
        t = self.per_sample(lambda m: sched.sample_t(m, generator=generator, device=x0.device), n).to(x0.dtype)
        eps = self.per_sample(lambda m: torch.randn(m, *x0.shape[1:], generator=generator), n).to(x0)
        x_all = sched.add_noise(x0, eps, t)
        if self.concept_sampling == "one":
            erase_keys = self._concept_keys[self.spec.erased[int(torch.randint(0, len(self.spec.erased), (1,),
                                                                               generator=generator))][1]]
        else:
            erase_keys = set().union(*self._concept_keys)
        keys = [self.conditioner.key(r) for r in requests]
        cond = self.encode(raw)
        masks = {"erase": [k in erase_keys for k in keys], "anchor": [k in self._anchor_keys for k in keys],
                 "uncond": [True] * n}
        conds = {"erase": cond, "anchor": cond, "uncond": self.conditioner.null(cond)}
        groups = []
        for term, mask in masks.items():
            if self._weight(term) > 0 and any(mask):
                m = torch.tensor(mask, device=x0.device)
                reqs = [r if term != "uncond" else self.conditioner.null_request for r, k in zip(requests, mask) if k]
                groups.append(Group(term, x_all[m], t[m], reqs, cond_index(conds[term], m)))
        return groups
