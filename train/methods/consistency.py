"""Latent consistency distillation with guidance (LCM, Luo et al. 2023) of a guided teacher: full fine-tuning with the
scale w as an input, or LCM-LoRA (Luo et al. 2023b) adapters that load onto the original pipeline."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from guidance.denoiser import Denoiser
from guidance.guided import GuidedDenoiser
from guidance.samplers import ddim_step
from losses.consistency import LOSSES, consistency_distance, consistency_output, solver_grid
from losses.distillation import check_choice, check_w_range, sample_guidance_scale
from models.ema import EMA
from models.w_embedding import WConditionedNetwork
from train.methods.base import MethodModule
from train.methods.guidance_distillation import LORA_TARGETS, distillable_guider, freeze, inject_lora, load_frozen
from train.methods.sampling import ConsistencySampling
from train.runtime.optim import LR_DECAYS, adamw_with_warmup


class ConsistencyDistillation(MethodModule):
    """Latent consistency distillation (Luo et al. 2023, arXiv 2310.04378, Algorithm 1; consistency distillation of
    Song et al. 2023, arXiv 2303.01469, Algorithm 2) with the guided teacher as the ODE solver.

    Per sample: a grid index i of the N-point solver grid (losses.consistency.solver_grid: t_i -> t_{i+1}, the skipping
    step k = 1000 / N timesteps on a 1000-step schedule), a scale w and noise; x_{t_i} = alpha x0 + sigma eps from the
    training image. The target is one DDIM step (Song et al. 2021, Eq. 12) of the teacher under the guider at w from
    t_i to t_{i+1} (LCM Eq. 11: the augmented PF-ODE solver; for CFG the step of the guided prediction), then the
    target network's consistency output there, f_target(x_{t_{i+1}}, t_{i+1}); the student's f(x_{t_i}, t_i) regresses
    it under the pseudo-Huber or squared distance (losses.consistency). f = c_skip x + c_out x0_hat enforces f(x, 0) = x.

    teacher:         path of a teacher checkpoint (`python -m train fit --config configs/digits/teacher.yaml`).
    guider, guider_params, negative: the guidance rule of the solver step (any single-model guider of guidance.guiders;
                     CFG default) and an optional negative request for its unconditional branch.
    w_min, w_max, w_distribution: the scales w ~ U[w_min, w_max] (or log-uniform) per sample, in this project's
                     convention D_u + w (D_c - D_u) (LCM's omega is w - 1: its [2, 14] is w in [3, 15]).
    w_input:         the student takes w as an input through the zero-initialised w-embedding of guidance
                     distillation (models.w_embedding; LCM's guidance-scale embedding); false: w is not an input (LCM-
                     LoRA), the guidance over [w_min, w_max] is baked in, and the LoRA loads onto the original pipeline.
    solver_steps:    N, the solver grid (LCM: 50).
    loss, huber_c:   "huber" (pseudo-Huber, c = huber_c, LCM code 0.001) or "l2".
    target_decay:    EMA rate mu of the target network (LCM: 0.95); 0: the target is the student itself without
                     gradient (LCM-LoRA's training script, no second network).
    lora_rank, lora_alpha, lora_targets: 0 fine-tunes the whole student; > 0 trains only peft LoRA adapters (plus the
                     w-embedding with w_input).
    lr, weight_decay, warmup_steps, lr_decay: AdamW with linear warm-up, then constant or cosine.
    val_scale, val_steps, val_samples: validation samples (val_steps consistency steps; val_scale with w_input).
    nonfinite, max_skips: what a NaN/inf loss or gradient does (train.runtime.nonfinite).
    teacher_config:  recorded from the teacher checkpoint on first use (leave unset).
    """

    method_name = "consistency_distillation"

    def __init__(self, teacher: str, guider: str = "cfg", guider_params: dict | None = None,
                 negative: int | str | None = None, w_min: float = 3.0, w_max: float = 15.0,
                 w_distribution: str = "uniform", w_input: bool = True, solver_steps: int = 50, loss: str = "huber",
                 huber_c: float = 0.001, target_decay: float = 0.95, w_embed_dim: int | None = None,
                 w_hidden_dim: int | None = None, w_scale: float = 1000.0, lora_rank: int = 0,
                 lora_alpha: float | None = None, lora_targets: list[str] | None = None, lr: float = 1e-5,
                 weight_decay: float = 0.0, warmup_steps: int = 100, lr_decay: str = "constant",
                 val_scale: float = 3.0, val_steps: int = 4, val_samples: int = 200,
                 teacher_config: dict | None = None, nonfinite: str = "skip", max_skips: int = 10):
        super().__init__(nonfinite, max_skips)
        self.save_hyperparameters()
        check_w_range(w_min, w_max, w_distribution)
        self.loss_name = check_choice("consistency loss", loss, LOSSES)
        if not huber_c > 0:
            raise ValueError(f"huber_c must be positive (LCM: 0.001), got {huber_c}")
        if not 0.0 <= target_decay < 1.0:
            raise ValueError(f"target_decay must be in [0, 1) (LCM: 0.95; 0: the student without gradient), got {target_decay}")
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = full fine-tuning), got {lora_rank}")
        self.guider = distillable_guider(guider, guider_params)
        self.negative, self.huber_c, self.w_input = negative, huber_c, w_input
        self.w_min, self.w_max, self.w_distribution = w_min, w_max, w_distribution

        teacher_module, cfg, unread = load_frozen(teacher, "teacher", teacher_config)
        self.hparams["teacher_config"] = cfg  # a self-contained checkpoint rebuilds without the teacher file
        self.teacher = freeze(teacher_module.sampling_denoiser())
        self.register_frozen(self.teacher.net, teacher, unread)  # left out of checkpoints (train.runtime.frozen)
        solver_grid(self.teacher.schedule, solver_steps)  # a grid that repeats times: the one-line error
        self.solver_steps = solver_steps
        net = copy.deepcopy(self.teacher.net).requires_grad_(True)
        if w_input:
            net = WConditionedNetwork(net, w_embed_dim, w_hidden_dim, w_scale)
        if lora_rank > 0:
            inject_lora(net.base if w_input else net, lora_rank, lora_alpha, lora_targets or list(LORA_TARGETS))
            for name, p in net.named_parameters():
                p.requires_grad_("lora_" in name or name.startswith("w_embedding."))
        self.student = Denoiser(net, self.teacher.schedule, self.teacher.parameterization, self.teacher.sigma_data)
        self.target = EMA(net, target_decay, warmup=False) if target_decay > 0 else None
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.lr_decay = check_choice("lr_decay", lr_decay, LR_DECAYS)
        self.val_scale, self.val_steps, self.val_samples = val_scale, val_steps, val_samples

    # --- sampling -----------------------------------------------------------------------------
    def sampling_denoiser(self) -> Denoiser:
        return self.student

    def recipe(self) -> ConsistencySampling:
        return ConsistencySampling(self.sampling_denoiser, self.solver_steps, self.val_steps, self.w_input,
                                   self.val_scale, (self.w_min, self.w_max))

    def val_sampling(self) -> dict:
        return {"scale": self.val_scale if self.w_input else None, "steps": self.val_steps}

    def teacher_guided(self) -> GuidedDenoiser:
        return GuidedDenoiser(self.teacher, self.guider)

    # --- training -----------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        if self.target is not None:
            self.target.module.eval()
        return self

    def _student_cond(self, cond: Any, w: Tensor) -> Any:
        return {"cond": cond, "w": w} if self.w_input else cond

    def consistency_loss(self, x0: Tensor, cond: Any, step: Tensor, eps: Tensor, w: Tensor) -> Tensor:
        """Per-sample loss [B] at solver-grid indices `step` [B] (0 .. solver_steps - 1), noise eps and images x0
        [B, C, H, W], scales w [B]; cond: the batch's condition (self.encode of its requests). Class docstring."""
        sched = self.student.schedule
        grid, grid_next = solver_grid(sched, self.solver_steps, x0.device)
        t, t_next = grid[step].to(x0.dtype), grid_next[step].to(x0.dtype)
        x_t = sched.add_noise(x0, eps, t)
        with torch.no_grad():
            guided = self.teacher_guided()(x_t, t, cond, w, self._negative(len(x_t)))
            x_next = ddim_step(guided, x_t, t_next, sched)  # LCM Eq. 11, DDIM solver of the guided teacher
            target_net = self.student if self.target is None else Denoiser(
                self.target.module, sched, self.student.parameterization, self.student.sigma_data)
            target = consistency_output(x_next, target_net(x_next, t_next, self._student_cond(cond, w)).x0, t_next, sched)
        pred = consistency_output(x_t, self.student(x_t, t, self._student_cond(cond, w)).x0, t, sched)
        return consistency_distance(pred, target, self.loss_name, self.huber_c)

    def _negative(self, n: int) -> Any:
        return None if self.negative is None else self.encode([self.negative] * n)

    def _loss(self, x0: Tensor | None, cond: Any, generator: torch.Generator | None = None) -> Tensor:
        """The batch's mean loss; every draw goes through per_sample, so N processes compute what one computes on
        the global batch."""
        if x0 is None:
            raise ValueError("consistency distillation starts the solver step from noised images, but the data gave "
                             "none (a prompt-only data module); train it on images, e.g. "
                             "data.captions.CaptionedImageDataModule for a text model")
        b, dev = x0.shape[0], x0.device
        gdev = generator.device if generator is not None else dev
        n = self.solver_steps
        step = self.per_sample(lambda m: torch.randint(0, n, (m,), generator=generator, device=gdev), b).to(dev)
        eps = self.noise_like(x0, generator)
        w = self.per_sample(lambda m: sample_guidance_scale(m, self.w_min, self.w_max, self.w_distribution, generator,
                                                            gdev), b).to(dev)
        return self.consistency_loss(x0, cond, step, eps, w).mean()

    def training_step(self, batch, batch_idx):
        x0, requests = batch
        loss = self._loss(x0, self.encode(requests))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_update(self):
        if self.target is not None:  # theta^- <- mu theta^- + (1 - mu) theta (LCM Algorithm 1)
            self.target.update(self.student.net)

    def validation_step(self, batch, batch_idx):
        x0, requests = batch
        gen = torch.Generator(device=x0.device).manual_seed(1000 + batch_idx)
        self.log("val/loss", self._loss(x0, self.encode(requests), gen), prog_bar=True)

    def trainable_networks(self):
        return {"student.net": self.student.net}

    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        return adamw_with_warmup(params, self.lr, self.weight_decay, self.warmup_steps, decay=self.lr_decay,
                                 total_steps=self.trainer.max_steps if self.lr_decay != "constant" else None)
