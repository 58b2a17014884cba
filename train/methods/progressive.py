"""Guidance distillation, stage 2: progressive distillation of a w-conditioned student, N -> N/2 -> ... steps."""
from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from guidance.denoiser import Denoiser
from guidance.samplers import ddim_step
from guidance.schedules import Schedule, _bcast
from losses.distillation import (LOSS_SPACES, W_DISTRIBUTIONS, WEIGHTINGS, check_choice, guidance_distillation_loss,
                                 progressive_target, sample_guidance_scale)
from models.ema import EMA, gathered_weights
from models.w_embedding import WInputGuided
from train.methods.base import MethodModule
from train.methods.guidance_distillation import freeze, load_frozen
from train.methods.sampling import WInputSampling

CLEAN = -1.0  # time marker of the samplers: the step after the last one reaches clean data (alpha 1, sigma 0)


def alpha_sigma_or_clean(schedule: Schedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """alpha, sigma at t [B] broadcast to like [B, ...]; t < 0 (CLEAN) gives alpha = 1, sigma = 0."""
    tt = _bcast(t, like)
    a, s = schedule.alpha_sigma(tt.clamp(min=0))
    clean = tt < 0
    return torch.where(clean, torch.ones_like(a), a), torch.where(clean, torch.zeros_like(s), s)


def check_grid_halving(schedule: Schedule, start_steps: int, rounds: int) -> None:
    """Refuse, saying what to change, a schedule on which `rounds` halvings from start_steps DDIM steps do not nest:
    for each round's N (start_steps, start_steps / 2, ...) the N / 2-step grid must be every other point of the
    N-step grid (so two teacher steps span one student step) and the N-step grid must not repeat a time (a discrete
    schedule with fewer timesteps than N). Rectified flow (any shift), EDM and continuous VP schedules nest for every
    N; a discrete VP schedule's "trailing" spacing rounds to its timesteps, so it nests for some N only (1000 steps,
    as SD 1.5: every power of two up to 512, but not 224 -> 112) and repeats times past its step count."""
    name = type(schedule).__name__
    for k in range(rounds):
        n = start_steps // 2 ** k
        fine, coarse = schedule.sampling_times(n), schedule.sampling_times(n // 2)
        if not bool((fine[1:] < fine[:-1]).all()):
            limit = getattr(schedule, "num_steps", None)
            raise ValueError(f"{name}.sampling_times({n}) repeats times{f' (the schedule has {limit} timesteps)' if limit else ''}, "
                             f"so some teacher steps would not move; choose start_steps <= "
                             f"{limit if limit else 'the schedule resolution'} (e.g. 64)")
        if not torch.equal(fine[::2], coarse):
            raise ValueError(f"{name}.sampling_times({n // 2}) is not every other point of sampling_times({n}), so two "
                             f"teacher steps do not span one student step; choose start_steps so that num_steps / "
                             f"start_steps is a power of two fraction (e.g. start_steps 64 with 1000 discrete steps) "
                             f"or use a continuous schedule")


class ProgressiveDistillation(MethodModule):
    """Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512, Algorithm 2) of a stage-1 guidance-
    distilled student, with w kept as an input (Meng et al. 2023, sec. 4.2).

    Round k: the round teacher (a frozen copy of the model at the end of round k - 1; the stage-1 student
    for round 0) samples with N_k = start_steps / 2^k DDIM steps; the student learns N_k / 2 steps by
    matching two teacher steps t -> t' -> t'' with one step, through the x0 target of
    losses.distillation.progressive_target. The student's grid is every other point of the teacher's,
    i.e. schedule.sampling_times(N_k / 2) == schedule.sampling_times(N_k)[::2] (checked at start, see
    `check_grid_halving`). Each round lasts `steps_per_round` optimizer steps; at a boundary the student's EMA
    weights become both the new round teacher and the student's start, the EMA restarts and Adam's moments are
    cleared. A checkpoint `round_{k}_{N_k/2}steps.ckpt` is written at the end of every round beside last.ckpt.

    Class- and text-conditioned students alike (the condition is whatever the stage-1 network's conditioner
    encodes); the data must give images (digits, CaptionedImageDataModule): the round teacher's two steps start
    from noised data. Under the multi-engine DeepSpeed strategy (ZeRO 1-3) the round boundary reloads the student
    through the strategy (train.runtime.strategy.MultiEngineDeepSpeed.load_network), which also refreshes ZeRO's
    fp32 master partitions and clears the engine's optimizer state.

    student:         path of a stage-1 checkpoint (train.methods.guidance_distillation.GuidanceDistillation).
    start_steps:     the round-0 teacher's step count N (a power-of-two multiple of end_steps).
    end_steps:       the last student's step count (1 for one-step sampling).
    steps_per_round: optimizer steps per halving; training stops after the last round
                     (set trainer.max_steps >= rounds * steps_per_round).
    w_min, w_max, w_distribution: training scales; default: those of the stage-1 run.
    loss_space, weighting: see losses.distillation (default x0 with truncated SNR, Salimans & Ho sec. 4).
    lr, weight_decay, warmup_steps, anneal_lr: AdamW; every round warms up linearly over warmup_steps
                     and (anneal_lr) decays linearly to 0 at its end, as Salimans & Ho (appendix) do.
    ema_decay:       EMA of the student within a round (0 disables).
    val_scale, val_samples: validation samples use the current student's step count.
    student_config:  recorded from the stage-1 checkpoint on first use (leave unset).
    nonfinite, max_skips: what a NaN/inf loss or gradient does: "skip" the update or "stop" (train.runtime.nonfinite).
    """

    method_name = "progressive_distillation"

    def __init__(self, student: str, start_steps: int = 64, end_steps: int = 1, steps_per_round: int = 300,
                 w_min: float | None = None, w_max: float | None = None, w_distribution: str | None = None,
                 loss_space: str = "x0", weighting: str = "snr_trunc", lr: float = 1e-4, weight_decay: float = 0.0,
                 warmup_steps: int = 20, anneal_lr: bool = True, ema_decay: float = 0.99, val_scale: float = 3.0,
                 val_samples: int = 200, student_config: dict | None = None, nonfinite: str = "skip",
                 max_skips: int = 10):
        super().__init__(nonfinite, max_skips)
        self.save_hyperparameters()
        ratio = start_steps / end_steps if end_steps >= 1 else 0
        if end_steps < 1 or ratio < 2 or ratio != 2 ** round(math.log2(ratio)):
            raise ValueError(f"start_steps / end_steps must be a power of two >= 2 with end_steps >= 1 "
                             f"(e.g. 64 and 1), got {start_steps} and {end_steps}")
        if steps_per_round < 1:
            raise ValueError(f"steps_per_round must be positive, got {steps_per_round}")
        self.loss_space = check_choice("loss space", loss_space, LOSS_SPACES)
        self.weighting = check_choice("loss weighting", weighting, WEIGHTINGS)
        self.start_steps, self.end_steps, self.steps_per_round = start_steps, end_steps, steps_per_round
        self.num_rounds = round(math.log2(ratio))

        stage1, cfg, unread = load_frozen(student, "guidance_distillation", student_config, "student")
        self.hparams["student_config"] = cfg
        self.distilled_guider = stage1.distilled_guider
        self.w_min = stage1.w_min if w_min is None else w_min
        self.w_max = stage1.w_max if w_max is None else w_max
        self.w_distribution = check_choice("w distribution", w_distribution or stage1.w_distribution, W_DISTRIBUTIONS)
        start = stage1.sampling_denoiser()
        self.student = Denoiser(copy.deepcopy(start.net).train().requires_grad_(True), start.schedule,
                                start.parameterization, start.sigma_data)
        self.round_teacher = freeze(copy.deepcopy(self.student))
        # round 0's teacher is the stage-1 student as `student` gives it: left out of checkpoints until round 1
        # replaces it (_start_round)
        self.register_frozen(self.round_teacher.net, student, unread)
        self.ema = EMA(self.student.net, ema_decay) if ema_decay > 0 else None
        self.register_buffer("round_index", torch.zeros((), dtype=torch.long))  # saved with the weights
        self._check_grids()
        self.lr, self.weight_decay, self.warmup_steps, self.anneal_lr = lr, weight_decay, warmup_steps, anneal_lr
        self.val_scale, self.val_samples = val_scale, val_samples

    # --- rounds -------------------------------------------------------------------------------
    def teacher_steps(self, k: int | None = None) -> int:
        """The round teacher's step count in round k (default: the current round)."""
        return self.start_steps // 2 ** (int(self.round_index) if k is None else k)

    def student_steps(self, k: int | None = None) -> int:
        return self.teacher_steps(k) // 2

    @property
    def val_steps(self) -> int:  # validation samples with the current student's step count
        return self.student_steps()


    def _check_grids(self) -> None:
        check_grid_halving(self.student.schedule, self.start_steps, self.num_rounds)

    def _start_round(self, k: int) -> None:
        """Round boundary: the model at the end of the last round becomes the round teacher and the
        student's starting point; EMA restarts; Adam's moments are cleared (Salimans & Ho, Algorithm 2)."""
        source = self.ema.module if self.ema is not None else self.student.net
        with gathered_weights(source):  # the student's own weights are partitioned under ZeRO-3
            src = {key: v.detach().clone() for key, v in source.state_dict().items()}
        self.round_teacher.net.load_state_dict(src)
        self.frozen_replaced(self.round_teacher.net, f"is round {k}'s teacher")  # saved whole from now on
        if self.ema is not None:
            self.ema.module.load_state_dict(src)
            self.ema.num_updates.zero_()
        strategy = self.trainer.strategy
        if hasattr(strategy, "load_network"):  # DeepSpeed: weights, fp32 master partitions and optimizer state
            (name,) = self.trainable_networks()
            strategy.load_network(name, src)
        else:
            self.student.net.load_state_dict(src)
            for opt in self.trainer.optimizers:
                opt.state.clear()
        self.round_index.fill_(k)

    def on_train_batch_start(self, batch, batch_idx):
        k = min(self.global_step // self.steps_per_round, self.num_rounds - 1)
        if k != int(self.round_index):
            self._start_round(k)

    def on_update(self):
        if self.ema is not None:  # here, not in on_train_batch_end, so checkpoints written by callbacks include it
            self.ema.update(self.student.net)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_step >= self.num_rounds * self.steps_per_round:
            self.trainer.should_stop = True  # the last round is done

    def on_fit_start(self) -> None:
        total = self.num_rounds * self.steps_per_round
        if self.trainer.max_steps != -1 and self.trainer.max_steps < total:
            warnings.warn(f"trainer.max_steps={self.trainer.max_steps} stops before the last round "
                          f"({self.num_rounds} rounds x {self.steps_per_round} steps = {total})")

    def configure_callbacks(self):
        return super().configure_callbacks() + [RoundCheckpoint()]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["progressive"] = {"round": int(self.round_index), "start_steps": self.start_steps,
                                     "teacher_steps": self.teacher_steps(), "student_steps": self.student_steps(),
                                     "steps_per_round": self.steps_per_round}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        info = checkpoint.get("progressive", {})
        for key in ("start_steps", "steps_per_round"):
            if key in info and info[key] != getattr(self, key):
                raise ValueError(f"the checkpoint was trained with {key}={info[key]} but the config says "
                                 f"{getattr(self, key)}; resume with the same {key}")
        super().on_load_checkpoint(checkpoint)  # the round-0 teacher, when the checkpoint left it out

    # --- sampling -----------------------------------------------------------------------------
    def sampling_denoiser(self) -> Denoiser:
        if self.ema is None:
            return self.student
        return Denoiser(self.ema.module, self.student.schedule, self.student.parameterization, self.student.sigma_data)

    def recipe(self) -> WInputSampling:
        """The w-input student at the DDIM step count it is distilled to (the current round's)."""
        return WInputSampling(self.sampling_denoiser, self.distilled_guider, self.student_steps())

    # --- training -----------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.round_teacher.eval()
        if self.ema is not None:
            self.ema.module.eval()
        return self

    @torch.no_grad()
    def two_teacher_steps(self, x_t: Tensor, t: Tensor, t_mid: Tensor, t_next: Tensor, labels: Any, w: Tensor) -> Tensor:
        """z_t'' [B, C, H, W]: two deterministic DDIM steps t -> t' -> t'' of the round teacher (w as input).
        x_t [B, C, H, W]; t, t_mid, t_next [B] (t_next may be CLEAN); labels: the condition; w [B]."""
        guided = WInputGuided(self.round_teacher)
        sched = self.round_teacher.schedule
        x_mid = ddim_step(guided(x_t, t, labels, w), x_t, t_mid, sched)
        return ddim_step(guided(x_mid, t_mid, labels, w), x_mid, t_next, sched)

    def progressive_loss(self, x0: Tensor, labels: Any, step: Tensor, eps: Tensor, w: Tensor) -> Tensor:
        """Per-sample loss [B] for student step indices `step` [B] (0 .. student_steps - 1) at given noise;
        x0, eps [B, C, H, W]; labels: the batch's condition (self.encode of its requests: labels or prompts); w [B].

        x_t = alpha x0 + sigma eps at the student's grid time t = times[step]; the target is the x0 whose
        one DDIM step reaches the teacher's two-step result (Salimans & Ho 2022, Algorithm 2)."""
        sched = self.student.schedule
        grid = sched.sampling_times(self.teacher_steps(), device=x0.device).to(x0.dtype)
        grid = torch.cat([grid, grid.new_full((1,), CLEAN)])  # teacher grid + the final step to clean data
        t, t_mid, t_next = grid[2 * step], grid[2 * step + 1], grid[2 * step + 2]
        x_t = sched.add_noise(x0, eps, t)
        x_next = self.two_teacher_steps(x_t, t, t_mid, t_next, labels, w)
        a_t, s_t = sched.alpha_sigma(_bcast(t, x_t))
        a_n, s_n = alpha_sigma_or_clean(sched, t_next, x_t)
        target = progressive_target(x_t, x_next, a_t, s_t, a_n, s_n)
        pred = self.student(x_t, t, {"cond": labels, "w": w})
        return guidance_distillation_loss(pred, target, self.loss_space, self.weighting)

    def _loss(self, x0: Tensor, labels: Any, generator: torch.Generator | None = None) -> Tensor:
        """The batch's mean loss; every draw (student step, noise, w) goes through per_sample, so N processes
        compute what one process computes on the global batch."""
        if x0 is None:
            raise ValueError("progressive distillation starts the round teacher's two steps from noised images, but "
                             "the data gave none (a prompt-only data module); train it on images, e.g. "
                             "data.captions.CaptionedImageDataModule for a text model")
        b, dev = x0.shape[0], x0.device
        gdev = generator.device if generator is not None else dev
        steps = self.student_steps()
        step = self.per_sample(lambda n: torch.randint(0, steps, (n,), generator=generator, device=gdev), b).to(dev)
        eps = self.noise_like(x0, generator)
        w = self.per_sample(lambda n: sample_guidance_scale(n, self.w_min, self.w_max, self.w_distribution, generator,
                                                            gdev), b).to(dev)
        return self.progressive_loss(x0, labels, step, eps, w).mean()

    def training_step(self, batch, batch_idx):
        x0, requests = batch
        loss = self._loss(x0, self.encode(requests))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/round", float(self.round_index))
        return loss

    def validation_step(self, batch, batch_idx):
        x0, requests = batch
        gen = torch.Generator(device=x0.device).manual_seed(1000 + batch_idx)
        self.log("val/loss", self._loss(x0, self.encode(requests), gen), prog_bar=True)

    def trainable_networks(self):
        return {"student.net": self.student.net}

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.student.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        spr, warm, anneal = self.steps_per_round, max(1, self.warmup_steps), self.anneal_lr

        def per_round(step: int) -> float:  # linear warm-up, then linear decay to 0 within each round
            r = step % spr
            return min(1.0, (r + 1) / warm) * ((1.0 - r / spr) if anneal else 1.0)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, per_round)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class RoundCheckpoint(L.Callback):
    """Writes `round_{k}_{steps}steps.ckpt` (k: round index, steps: that round's student step count) into
    the checkpoint folder when a round of ProgressiveDistillation ends."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: ProgressiveDistillation, outputs, batch, batch_idx):
        step, spr = trainer.global_step, pl_module.steps_per_round
        if step == 0 or step % spr or step > pl_module.num_rounds * spr:
            return
        cb = trainer.checkpoint_callback
        folder = Path(cb.dirpath) if cb is not None and cb.dirpath else Path(trainer.default_root_dir) / "checkpoints"
        k = int(pl_module.round_index)
        trainer.save_checkpoint(folder / f"round_{k}_{pl_module.student_steps(k)}steps.ckpt", weights_only=False)
