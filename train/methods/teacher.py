"""Teacher pretraining: a class- (or text-) conditional diffusion model trained with label dropout."""
from __future__ import annotations

import torch
from torch import Tensor

from guidance.conditions import cond_device, cond_size
from guidance.denoiser import Denoiser
from guidance.schedules import Schedule, VPCosine
from losses.denoising import denoising_loss
from models.adapters import ConditionalNetwork
from models.ema import EMA
from train.methods.base import MethodModule
from train.runtime.optim import adamw_with_warmup


class TeacherPretraining(MethodModule):
    """Denoising training with classifier-free label dropout (Ho & Salimans 2022, Algorithm 1) and EMA.

    net:              the network (e.g. models.adapters.ClassConditionalUNet).
    schedule:         noise schedule (guidance.schedules); VP cosine by default.
    parameterization: what the network predicts: eps, x0, v, flow or edm.
    p_uncond:         probability of replacing a label by the null label.
    lr, weight_decay, warmup_steps: AdamW with linear warm-up.
    ema_decay:        EMA of the weights used for sampling (0 disables).
    val_scale, val_steps, val_samples: the CFG scale, sampler steps and sample count of validation metrics.
    nonfinite, max_skips: what a NaN/inf loss or gradient does: "skip" the update or "stop" (train.runtime.nonfinite).
    """

    method_name = "teacher"

    def __init__(self, net: ConditionalNetwork, schedule: Schedule | None = None, parameterization: str = "eps",
                 p_uncond: float = 0.1, lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 200,
                 ema_decay: float = 0.999, val_scale: float = 2.0, val_steps: int = 20, val_samples: int = 200,
                 nonfinite: str = "skip", max_skips: int = 10):
        super().__init__(nonfinite, max_skips)
        self.save_hyperparameters()
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {p_uncond}")
        self.denoiser = Denoiser(net, schedule or VPCosine(), parameterization)
        self.ema = EMA(net, ema_decay) if ema_decay > 0 else None
        self.p_uncond, self.lr, self.weight_decay, self.warmup_steps = p_uncond, lr, weight_decay, warmup_steps
        self.val_scale, self.val_steps, self.val_samples = val_scale, val_steps, val_samples

    def sampling_denoiser(self) -> Denoiser:
        if self.ema is None:
            return self.denoiser
        return Denoiser(self.ema.module, self.denoiser.schedule, self.denoiser.parameterization, self.denoiser.sigma_data)

    def _loss(self, x0: Tensor, cond, generator=None) -> Tensor:
        t = self.per_sample(lambda n: self.denoiser.schedule.sample_t(n, generator=generator, device=x0.device), x0.shape[0])
        eps = self.noise_like(x0, generator)
        return denoising_loss(self.denoiser, x0, cond, t, eps).mean()

    def training_step(self, batch, batch_idx):
        x0, requests = batch
        cond = self.encode(requests)
        cond = self.denoiser.net.drop_cond(cond, self.p_uncond, u=self.uniform(cond_size(cond), cond_device(cond)))
        loss = self._loss(x0, cond)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_update(self):
        # EMA right after the weights change, so checkpoints written by callbacks at this step include it
        if self.ema is not None:
            self.ema.update(self.denoiser.net)

    def validation_step(self, batch, batch_idx):
        x0, requests = batch
        gen = torch.Generator(device=x0.device).manual_seed(1000 + batch_idx)  # same t and noise every validation
        self.log("val/loss", self._loss(x0, self.encode(requests), gen), prog_bar=True)

    def trainable_networks(self):
        return {"denoiser.net": self.denoiser.net}

    def configure_optimizers(self):
        return adamw_with_warmup(self.denoiser.net.parameters(), self.lr, self.weight_decay, self.warmup_steps)
