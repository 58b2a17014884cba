"""Guidance distillation, stage 1 (Meng et al. 2023): a w-conditioned student regresses the guided teacher, on noised
images or, data-free, on the guided teacher's own trajectories."""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from guidance.denoiser import Denoiser
from guidance.guided import GuidedDenoiser, teacher_target
from guidance.guiders import build_guider
from guidance.samplers import sample_until
from losses.distillation import (LOSS_SPACES, WEIGHTINGS, check_choice, check_w_range, guidance_distillation_loss,
                                 sample_guidance_scale)
from models.ema import EMA
from models.w_embedding import WConditionedNetwork
from train.methods.base import MethodModule
from train.methods.sampling import WInputSampling
from train.runtime.checkpoint import CHECKPOINT_KEY
from train.runtime.optim import LR_DECAYS, adamw_with_warmup

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")  # diffusers UNet attention + ResNet convs


def load_frozen(path: str, expect: str, config: dict | None,
                arg: str = "teacher") -> tuple[MethodModule, dict, str | None]:
    """The method module a distillation starts from, its config (to record in our hyper-parameters), and why it was
    not read from `path` (None when it was).

    The checkpoint at `path` is loaded (weights_only) whenever it exists. When it does not, or cannot be loaded, and
    `config` (recorded by an earlier run) is given, the module is rebuilt from the config without `path`: its weights
    then come from the distillation checkpoint being loaded (a self-contained one, or one written before frozen
    networks were left out of checkpoints: train.runtime.frozen). Without `config`, a missing checkpoint is a
    FileNotFoundError naming the init argument `arg` to pass it as."""
    from pathlib import Path

    from train.runtime.checkpoint import CheckpointError, load_method, read_checkpoint
    from train.runtime.config import instantiate

    unread = "does not exist"
    if Path(path).exists():
        try:
            ckpt = read_checkpoint(path)
            module = load_method(path, expect=expect, ckpt=ckpt)
            return module, config if config is not None else ckpt[CHECKPOINT_KEY]["config"], None
        except CheckpointError as e:
            if config is None:
                raise
            unread = f"cannot be loaded ({str(e).splitlines()[0][:200]})"
    if config is None:
        train = {"teacher": "configs/digits/teacher.yaml", "student": "configs/digits/guidance_distill.yaml"}[arg]
        raise FileNotFoundError(f"{arg} checkpoint {path!r} does not exist; train one with `python -m train fit "
                                f"--config {train}` and pass its last.ckpt as --model.init_args.{arg}")
    cfg = {k: v for k, v in config.items() if k != "_instantiator"}
    return instantiate({"class_path": cfg.pop("_class_path"), "init_args": cfg}), config, unread


def distillable_guider(name: str, params: dict | None):
    """The guider `name` built with `params`, refused with one line when it needs a second model (autoguidance's
    weak network): a student distils rules that use the teacher alone."""
    guider = build_guider(name, **(params or {}))
    if any(b.model != "main" for b in guider.branches(None)):
        raise ValueError(f"guider {name!r} needs a second model (autoguidance); distil a rule that uses the teacher alone")
    return guider


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no gradients (the frozen teacher of DESIGN.md, "Methods as Lightning modules")."""
    return module.eval().requires_grad_(False)


def inject_lora(net: nn.Module, rank: int, alpha: float | None, targets: list[str]) -> None:
    """Add peft LoRA adapters (Hu et al. 2021, arXiv 2106.09685) to the `targets` layers of `net` in place.

    lora_B starts at zero, so the adapted network equals the original exactly at initialisation."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets),
                                       lora_dropout=0.0), net)


class GuidanceDistillation(MethodModule):
    """Stage 1 of Meng et al. 2023 (arXiv 2210.03142, sec. 4.1): a student s(x_t, t, c, w), initialised
    from the teacher plus a zero-initialised w-embedding (models.w_embedding), regresses the frozen
    teacher's guided prediction at random t and per-sample w, on noised training images.

    Data-free (a data module that yields no images, e.g. data.prompts.PromptDataModule's (None, prompts), or
    (None, labels) for a class model): x_t comes from the guided teacher itself. Per batch, a grid step k is drawn
    from 0 .. trajectory_steps - 1 and the teacher, under the distilled guider at the sample's w (or at
    `trajectory_scale`), runs k DDIM steps (Song et al. 2021, Eq. 12) from noise (guidance.samplers.sample_until); the
    student regresses the teacher's guided prediction at that x_t and grid time, as on images.

    teacher:        path of a teacher checkpoint (`python -m train fit --config configs/digits/teacher.yaml`).
    guider, guider_params: the guidance rule the student learns, by name (guidance.guiders; CFG default;
                    apg, rescale, cfg_zero_star, ... work; rules that need a second model do not).
    negative:       a request (a class, or a negative prompt) whose condition the guider's "uncond" branch uses instead
                    of the null condition, at training and so in what the student learns (None: the null condition).
    w_min, w_max, w_distribution: the scales w ~ U[w_min, w_max] ("uniform") or log-uniform, per sample.
    loss_space, weighting: the error's parameterisation (x0, eps, v) and the weight omega(lambda_t) (none,
                    snr, snr_trunc, snr_plus_one); see losses.distillation. Default: x0 with truncated SNR
                    (Salimans & Ho 2022, sec. 4), the weighting Meng et al. use.
    w_embed_dim, w_hidden_dim, w_scale: the w-embedding (models.w_embedding.WConditionedNetwork).
    lora_rank:      0 fine-tunes the whole student; > 0 trains only peft LoRA adapters of that rank on
                    `lora_targets` (plus the w-embedding). lora_alpha: LoRA scale numerator (default rank).
    lr, weight_decay, warmup_steps: AdamW with linear warm-up. ema_decay: EMA of the student (0 disables).
    lr_decay:         "constant" after the warm-up, or "cosine": down to 0 at trainer.max_steps (train.runtime.optim.lr_factor).
    val_scale, val_steps, val_samples: the scale and steps of validation samples (one evaluation per step).
    nonfinite, max_skips: what a NaN/inf loss or gradient does: "skip" the update or "stop" (train.runtime.nonfinite).
    teacher_config: recorded from the teacher checkpoint on first use (leave unset); it lets a self-contained
                    student checkpoint (train.runtime.frozen) be rebuilt without the teacher file.
    trajectory_steps: data-free only: the DDIM grid of the teacher's trajectories (x_t sits on one of its points).
    trajectory_scale: data-free only: the scale the trajectories are sampled at (None: each sample's w).
    """

    method_name = "guidance_distillation"

    def __init__(self, teacher: str, guider: str = "cfg", guider_params: dict | None = None,
                 negative: int | str | None = None, w_min: float = 1.0, w_max: float = 6.0,
                 w_distribution: str = "uniform", loss_space: str = "x0", weighting: str = "snr_trunc",
                 w_embed_dim: int | None = None, w_hidden_dim: int | None = None, w_scale: float = 1000.0,
                 lora_rank: int = 0, lora_alpha: float | None = None, lora_targets: list[str] | None = None,
                 lr: float = 1e-4, weight_decay: float = 0.0, warmup_steps: int = 100, ema_decay: float = 0.999,
                 val_scale: float = 3.0, val_steps: int = 20, val_samples: int = 200,
                 teacher_config: dict | None = None, nonfinite: str = "skip", max_skips: int = 10,
                 lr_decay: str = "constant", trajectory_steps: int = 8, trajectory_scale: float | None = None):
        super().__init__(nonfinite, max_skips)
        self.save_hyperparameters()
        check_w_range(w_min, w_max, w_distribution)
        self.loss_space = check_choice("loss space", loss_space, LOSS_SPACES)
        self.weighting = check_choice("loss weighting", weighting, WEIGHTINGS)
        self.guider = distillable_guider(guider, guider_params)
        if not isinstance(trajectory_steps, int) or trajectory_steps < 1:
            raise ValueError(f"trajectory_steps must be a positive integer (the DDIM grid of data-free trajectories), "
                             f"got {trajectory_steps!r}")
        if trajectory_scale is not None and not math.isfinite(trajectory_scale):
            raise ValueError(f"trajectory_scale must be a finite guidance scale or null (each sample's w), "
                             f"got {trajectory_scale}")
        self.trajectory_steps, self.trajectory_scale = trajectory_steps, trajectory_scale
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = full fine-tuning), got {lora_rank}")
        self.distilled_guider = guider
        self.negative = negative
        self.w_min, self.w_max, self.w_distribution = w_min, w_max, w_distribution

        teacher_module, cfg, unread = load_frozen(teacher, "teacher", teacher_config)
        self.hparams["teacher_config"] = cfg  # recorded: a self-contained checkpoint rebuilds without the file
        self.teacher = freeze(teacher_module.sampling_denoiser())
        self.register_frozen(self.teacher.net, teacher, unread)  # left out of checkpoints (train.runtime.frozen)
        net = WConditionedNetwork(copy.deepcopy(self.teacher.net).requires_grad_(True), w_embed_dim, w_hidden_dim, w_scale)
        if lora_rank > 0:
            inject_lora(net.base, lora_rank, lora_alpha, lora_targets or list(LORA_TARGETS))
            for name, p in net.named_parameters():
                p.requires_grad_("lora_" in name or name.startswith("w_embedding."))
        self.student = Denoiser(net, self.teacher.schedule, self.teacher.parameterization, self.teacher.sigma_data)
        self.ema = EMA(net, ema_decay) if ema_decay > 0 else None
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.lr_decay = check_choice("lr_decay", lr_decay, LR_DECAYS)
        self.val_scale, self.val_steps, self.val_samples = val_scale, val_steps, val_samples

    # --- sampling -----------------------------------------------------------------------------
    def recipe(self) -> WInputSampling:
        return WInputSampling(self.sampling_denoiser, self.distilled_guider)

    def sampling_denoiser(self) -> Denoiser:
        if self.ema is None:
            return self.student
        return Denoiser(self.ema.module, self.student.schedule, self.student.parameterization, self.student.sigma_data)

    def teacher_guided(self) -> GuidedDenoiser:
        """The frozen teacher under the distilled guider (two evaluations per call for CFG)."""
        return GuidedDenoiser(self.teacher, self.guider)

    # --- training -----------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen networks stay in eval mode (dropout off) while the student trains
        if self.ema is not None:
            self.ema.module.eval()
        return self

    def distillation_loss(self, x0: Tensor, cond: Any, t: Tensor, eps: Tensor, w: Tensor) -> Tensor:
        """Per-sample stage-1 loss [B] at given noise: x0, eps [B, C, H, W]; cond: the batch's condition (self.encode
        of its requests); t [B] in [0, 1]; w [B].

        x_t = alpha x0 + sigma eps (real images noised); then `regression_loss`."""
        return self.regression_loss(self.student.schedule.add_noise(x0, eps, t), cond, t, w)

    def regression_loss(self, x_t: Tensor, cond: Any, t: Tensor, w: Tensor) -> Tensor:
        """Per-sample loss [B] at x_t [B, C, H, W], times t [B], scales w [B]: the target is the guided teacher's x0 at
        (x_t, t, c, w) (guidance.guided.teacher_target, no grad); loss = losses.distillation.guidance_distillation_loss."""
        target = teacher_target(self.teacher_guided(), x_t, t, cond, w, space="x0", neg_cond=self._negative(len(x_t)))
        pred = self.student(x_t, t, {"cond": cond, "w": w})
        return guidance_distillation_loss(pred, target, self.loss_space, self.weighting)

    def _negative(self, n: int) -> Any:
        return None if self.negative is None else self.encode([self.negative] * n)

    def teacher_trajectory(self, noise: Tensor, cond: Any, w: Tensor, stop: int) -> tuple[Tensor, Tensor]:
        """Data-free x_t [B, C, H, W] and t [B]: the guided teacher's DDIM trajectory from unit noise [B, C, H, W],
        stopped after `stop` of its `trajectory_steps` steps (guidance.samplers.sample_until), sampled at
        `trajectory_scale` or else at the samples' own w [B]."""
        scale = w if self.trajectory_scale is None else self.trajectory_scale
        return sample_until(self.teacher_guided(), noise, cond, scale, self.trajectory_steps, stop,
                            neg_cond=self._negative(len(noise)))

    def _loss(self, x0: Tensor | None, cond: Any, generator: torch.Generator | None = None, n: int | None = None) -> Tensor:
        """The batch's mean loss; x0 None (data-free): n samples of the teacher's trajectories (class docstring).
        Every draw goes through per_sample, so N processes compute what one computes on the global batch."""
        if x0 is None:
            return self._data_free_loss(cond, n, generator)
        b, dev = x0.shape[0], x0.device
        t = self.per_sample(lambda m: self.student.schedule.sample_t(m, generator=generator, device=dev), b)
        eps = self.noise_like(x0, generator)
        w = self.per_sample(lambda m: sample_guidance_scale(m, self.w_min, self.w_max, self.w_distribution, generator, dev), b)
        return self.distillation_loss(x0, cond, t, eps, w).mean()

    def _data_free_loss(self, cond: Any, n: int | None, generator: torch.Generator | None) -> Tensor:
        if n is None:
            raise ValueError("a data-free batch (no images) needs its size n")
        dev = self.device
        gdev = generator.device if generator is not None else dev
        steps = self.trajectory_steps  # one grid step for the whole global batch: the trajectories run together
        stop = int(self.per_sample(lambda m: torch.randint(0, steps, (1,), generator=generator, device=gdev).expand(m), n)[0])
        shape = self.sample_shape()
        noise = self.per_sample(lambda m: torch.randn(m, *shape, generator=generator, device=gdev), n).to(dev)
        w = self.per_sample(lambda m: sample_guidance_scale(m, self.w_min, self.w_max, self.w_distribution, generator, gdev), n)
        x_t, t = self.teacher_trajectory(noise, cond, w.to(dev), stop)
        return self.regression_loss(x_t, cond, t, w.to(dev)).mean()

    def training_step(self, batch, batch_idx):
        x0, requests = batch
        loss = self._loss(x0, self.encode(requests), n=len(requests))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(requests))  # data-free batches hold no tensor
        return loss

    def on_update(self):
        if self.ema is not None:  # here, not in on_train_batch_end, so checkpoints written by callbacks include it
            self.ema.update(self.student.net)

    def validation_step(self, batch, batch_idx):
        x0, requests = batch
        gen = torch.Generator(device=self.device).manual_seed(1000 + batch_idx)  # same t, noise and w every validation
        self.log("val/loss", self._loss(x0, self.encode(requests), gen, n=len(requests)), prog_bar=True,
                 batch_size=len(requests))

    def trainable_networks(self):
        return {"student.net": self.student.net}

    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        return adamw_with_warmup(params, self.lr, self.weight_decay, self.warmup_steps,
                                 decay=self.lr_decay,
                                 total_steps=self.trainer.max_steps if self.lr_decay != "constant" else None)
