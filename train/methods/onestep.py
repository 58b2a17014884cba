"""One-step (and few-step) distillation by distribution matching: DMD/DMD2, f-distill, PG-SB, Decoupled DMD, SiD."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from guidance.conditions import cond_device
from guidance.denoiser import Denoiser
from guidance.guided import GuidedDenoiser, teacher_target
from guidance.guiders import build_guider
from losses.dmd import dmd_loss, fake_score_loss
from losses.fdiv import fdistill_loss, two_stage_weights
from losses.sid import guided_denoising_loss
from models.ema import EMA
from models.fake_score import FakeScore
from models.frozen_dtype import frozen_dtype_of, run_frozen_in
from train.methods.base import MethodModule
from train.methods.onestep_config import (DiscriminatorArgs, FakeScoreArgs, ForgetArgs, GeneratorArgs, ObjectiveArgs,
                                          OptimizerArgs, as_group, check_combinations, check_pg_sb_range)
from train.methods.onestep_decoupled import DecoupledDMDObjective, check_renoise_times
from train.methods.onestep_discriminator import DiscriminatorTerms, check_real_data
from train.methods.onestep_forget import ScoreForgetting, check_forget
from train.methods.onestep_generator import GeneratorChain, generator_network, trainable_weights
from train.methods.onestep_sid import SiDObjective, check_sid, sid_p_uncond
from train.methods.onestep_updates import OneStepUpdates
from train.runtime.checkpoint import CHECKPOINT_KEY, load_teacher
from train.runtime.nonfinite import NonFiniteLoss  # noqa: F401 (re-export)


class OneStepDistillation(GeneratorChain, DiscriminatorTerms, ScoreForgetting, DecoupledDMDObjective, SiDObjective,
                          OneStepUpdates, MethodModule):
    """A one-step (or k-step) generator trained by distribution matching against a guided teacher.

    Networks: the generator G (a trainable copy of the teacher: x = G(z, c) is the teacher-architecture
    denoiser's x0-prediction at t_0 from sigma(t_0) z), the frozen teacher (the "real score", eval,
    requires_grad off, run under no_grad), the fake score (models.fake_score.FakeScore: full copy or LoRA
    on the teacher) and, when a GAN term or an f-divergence other than reverse KL needs one, a
    discriminator head on the fake score's (or the teacher's) bottleneck features (models.discriminator: a UNet's
    mid block; an SD3 / Flux transformer's image tokens after its last block).

    One training step (one data batch) = `fake_score.updates` fake-score (+ discriminator) updates, then one
    generator update (two time-scale rule, DMD2 sec. 4.2). Manual optimization with three optimizers;
    only the generator's optimizer is stepped through its LightningOptimizer, which is what advances
    `trainer.global_step`; the other two are stepped through `trainer.strategy.optimizer_step` (same
    precision/strategy hooks, no step count). So `trainer.max_steps` and `global_step` count generator
    updates. An update with a NaN/inf loss term or gradient goes through the shared NaN/inf policy
    (train.runtime.nonfinite): skipped and reported, or training stops; a skipped generator update does not count.

    Data: the generator needs none; each batch's labels (or text condition dict) are what the generator is asked
    for (so classes or prompts follow the data's frequencies), and its images (a text model's latents: e.g.
    data.captions.CaptionedImageDataModule) are the discriminator's real branch. Prompt-only data
    (data.prompts.PromptDataModule) serves DMD without a discriminator.
    The fake score starts as the teacher (which already fits the real digits) and then sees only
    generator samples.

    Arguments (the groups are train.methods.onestep_config's dataclasses; YAML gives each as a mapping, e.g.
    `objective: {divergence: jensen_shannon}`, the command line as `--model.init_args.objective.divergence ...`):
    teacher:          teacher checkpoint (`python -m train fit` with train.methods.teacher.TeacherPretraining) or a
                      diffusers pipeline folder; its sampling (EMA) network is used.
    teacher_config:   filled in automatically with the teacher's stored config, so a self-contained checkpoint
                      (train.runtime.frozen) can be rebuilt (load_method) even when `teacher` has moved; leave unset.
    weak_teacher:     checkpoint of the weak model for guider "autoguidance".
    guider, guider_params: the teacher's guidance rule by name (guidance.guiders.build_guider).
    guidance_scale:   the teacher's scale w (D_u + w (D_c - D_u)); the fake score is unguided.
    pg_sb_range:      [lo, hi]: per-sample w ~ U[lo, hi] for BOTH the teacher and the fake score (PG-SB,
                      SNOOPI, arXiv 2412.02687); the fake score then trains with label dropout.
    objective:        ObjectiveArgs: kind (dmd / decoupled / sid), divergence, f-distill's ratio_normalization,
                      ratio_time_bins, ratio_ema_rate (default: the authors' two-stage scheme), t_range and Decoupled
                      DMD's ca_t_range, dm_t_range, ca_weight, dm_weight, renoise (default: Decoupled-Hybrid); SiD's
                      alpha and SiD-LSG's lsg_fake_scale, lsg_train_scale (train.methods.onestep_sid).
    fake_score:       FakeScoreArgs: mode (lora / copy), rank, alpha, targets, updates, p_uncond, lr.
    discriminator:    DiscriminatorArgs: gan_weight, features (fake / teacher), layer, hidden, t_range, lr.
    generator:        GeneratorArgs: steps, times, lr; lora_rank > 0 (lora_alpha, lora_targets): a LoRA generator, the
                      teacher's weights frozen in its copy (DMD2's SDXL LoRA), exported as a LoRA for the original
                      pipeline; its EMA (ema_decay) is over the LoRA'd copy.
    optimizer:        OptimizerArgs: betas, weight_decay, warmup_steps, grad_clip (AdamW of every network).
    forget:           ForgetArgs (Score Forgetting Distillation): concepts, target (safe / esd), targets (safe
                      classes), eta; null: plain distillation.
    ema_decay:        EMA of the generator used for sampling (0 disables).
    frozen_dtype:     "float32", "bfloat16" or "float16": the dtype the frozen weights are held and run in (the
                      teacher, the LoRA fake score's shared base, the weak teacher; models.frozen_dtype); the
                      generator, the LoRA weights, a full-copy fake score and the discriminator stay float32.
    nonfinite:        what a NaN/inf loss term or gradient does: "skip" the update or "stop" (train.runtime.nonfinite).
    max_skips:        consecutive skipped generator updates before training stops with an error.
    val_samples:      samples drawn at each validation for the sample grid and the validation metrics.
    Each group also takes a dict of its fields when the module is built in Python.

    Beside this file: the generator's network and k-step chain (onestep_generator), the discriminator
    (onestep_discriminator), SiD (onestep_sid), Decoupled DMD (onestep_decoupled), SFD (onestep_forget) and the
    manual optimisation of the three networks (onestep_updates); DMD and f-distill's term is here.
    """

    method_name = "onestep"

    def __init__(self, teacher: str, teacher_config: dict | None = None, weak_teacher: str | None = None,
                 guider: str = "cfg", guider_params: dict | None = None, guidance_scale: float = 2.0,
                 pg_sb_range: list[float] | None = None, objective: ObjectiveArgs = ObjectiveArgs(),
                 fake_score: FakeScoreArgs = FakeScoreArgs(), discriminator: DiscriminatorArgs = DiscriminatorArgs(),
                 generator: GeneratorArgs = GeneratorArgs(), optimizer: OptimizerArgs = OptimizerArgs(),
                 forget: ForgetArgs | None = None, ema_decay: float = 0.99, frozen_dtype: str = "float32",
                 nonfinite: str = "skip", max_skips: int = 10, val_samples: int = 200):
        super().__init__(nonfinite, max_skips)
        self.save_hyperparameters()
        self.objective, self.fake_args = as_group(ObjectiveArgs, objective), as_group(FakeScoreArgs, fake_score)
        self.disc_args, self.optim_args = as_group(DiscriminatorArgs, discriminator), as_group(OptimizerArgs, optimizer)
        gen_args = as_group(GeneratorArgs, generator)
        forget = None if forget is None else as_group(ForgetArgs, forget)
        check_combinations(self.objective, guider, forget)
        if self.objective.kind == "sid":
            check_sid(self.objective, guider, pg_sb_range, self.fake_args.p_uncond)
        self.pg_sb_range = check_pg_sb_range(pg_sb_range)
        self.dmd_t_range, self.ca_t_range, self.dm_t_range = (self.objective.times(n) for n in ("t", "ca_t", "dm_t"))
        dtype = frozen_dtype_of(frozen_dtype)
        self.guidance_scale = guidance_scale
        p_uncond = self.fake_args.p_uncond
        self.fake_p_uncond = (0.1 if self.pg_sb_range else sid_p_uncond(self.objective)) if p_uncond is None else p_uncond
        # learning rates: the fake score's defaults to the generator's, the discriminator's to the fake score's
        fake_lr = self.fake_args.lr or gen_args.lr
        self.lrs = (gen_args.lr, fake_lr, self.disc_args.lr or fake_lr)
        self.val_samples = val_samples

        teacher_den, stored, unread = load_teacher(teacher, teacher_config)
        if teacher_config is None and stored is not None:
            self.hparams["teacher_config"] = stored  # lets a self-contained checkpoint rebuild without the teacher file
        # the generator is a copy (full, or frozen with LoRA) taken BEFORE the fake score's LoRA goes into the teacher
        self.generator = Denoiser(generator_network(teacher_den.net, gen_args.lora_rank, gen_args.lora_alpha,
                                                    gen_args.lora_targets),
                                  teacher_den.schedule, teacher_den.parameterization, teacher_den.sigma_data)
        self._generator_weights = trainable_weights(self.generator.net)
        self.ema = EMA(self.generator.net, ema_decay) if ema_decay > 0 else None
        fs = self.fake_args
        self.fake_score = FakeScore(teacher_den, fs.mode, fs.rank, fs.alpha, fs.targets, dtype)
        self.weak_teacher = load_teacher(weak_teacher, None)[0].requires_grad_(False).eval() if weak_teacher else None
        if self.weak_teacher is not None:
            run_frozen_in(self.weak_teacher.net, dtype)
            self.register_frozen(self.weak_teacher.net, weak_teacher)
        # left out of checkpoints (train.runtime.frozen): the teacher's network, in LoRA mode the fake score's shared
        # base (its adapters require grad and are kept), in copy mode the fake score's teacher
        self.register_frozen(teacher_den.net, teacher, unread)
        g = build_guider(guider, **(guider_params or {}))
        # wrappers kept out of the module tree so no weight is registered (and saved) twice
        self._guided = {"teacher": GuidedDenoiser(self.fake_score.teacher, g, self.weak_teacher)}
        if self.pg_sb_range:
            if any(b.model == "weak" for b in g.branches(None)):
                raise ValueError("pg_sb_range guides the fake score with the teacher's guider, which cannot need a "
                                 "weak model; use a guider such as 'cfg' with PG-SB")
            self._guided["fake"] = GuidedDenoiser(self.fake_score, copy.deepcopy(g))
        self._init_sid()
        self.forget = None if forget is None else check_forget(forget, g, teacher_den.net.conditioner)
        self._init_discriminator(teacher_den.net)
        times = gen_args.times or self.generator.schedule.sampling_times(gen_args.steps).tolist()
        self.register_buffer("generator_times", torch.tensor(times, dtype=torch.float32), persistent=False)
        self.generator_steps = len(times)
        if self.objective.kind == "decoupled":
            check_renoise_times(self.objective, times)
        self.ratio_scheme = self.objective.ratio_scheme() if self.divergence != "reverse_kl" else None
        if self.ratio_scheme is not None and self.ratio_scheme[0] == "two_stage" and self.ratio_scheme[1] > 0:
            # f-distill's per-time-bin running mean of r: training state, saved and resumed with the module
            self.register_buffer("ratio_ema", torch.ones(self.ratio_scheme[1]))
            self.register_load_state_dict_pre_hook(_keep_missing_ratio_ema)
        self.val_steps = self.generator_steps
        self.train()  # trainable networks in train mode, frozen ones in eval mode (see `train`)
        self._all_trainable = (self._generator_weights + self.fake_score.trainable_parameters()
                               + (list(self.disc_head.parameters()) if self.disc_head is not None else []))
        self.automatic_optimization = False

    @property
    def divergence(self) -> str:
        """The f-divergence of the DMD term (objective.divergence; reverse_kl = DMD)."""
        return self.objective.divergence

    @property
    def teacher(self) -> Denoiser:
        """The frozen teacher (in LoRA mode a view of the shared network with adapters off)."""
        return self.fake_score.teacher

    def check_data(self, datamodule) -> None:
        super().check_data(datamodule)
        if self.disc_head is not None:
            check_real_data(datamodule)

    def train(self, mode: bool = True) -> "OneStepDistillation":
        super().train(mode)
        for frozen in (self.weak_teacher, self.ema):  # frozen networks stay in eval mode (FakeScore keeps the teacher's)
            if frozen is not None:
                frozen.eval()
        return self

    # --- predictions ----------------------------------------------------------------------------------
    def _scales(self, b: int, device) -> Tensor:
        if self.pg_sb_range is None:
            return torch.full((b,), float(self.guidance_scale), device=device)
        lo, hi = self.pg_sb_range
        return lo + (hi - lo) * self.uniform(b, device)

    @torch.no_grad()
    def _fake_x0(self, x_t: Tensor, t: Tensor, cond: Tensor, w: Tensor) -> Tensor:
        if "fake" in self._guided:  # PG-SB: the fake score is guided with the teacher's per-sample scale
            return self._guided["fake"](x_t, t, cond, w).x0
        return self.fake_score(x_t, t, cond).x0

    def _uniform_t(self, b: int, rng: tuple[float, float], device, below: float | None = None) -> Tensor:
        """Times [b] uniform on [lo, hi) of `rng`, hi lowered to `below` when given (times cleaner than it)."""
        lo, hi = rng
        hi = hi if below is None else min(hi, below)
        return lo + (hi - lo) * self.uniform(b, device)

    # --- losses -----------------------------------------------------------------------------------------
    def fake_losses(self, x_real: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The fake score's denoising loss on fresh generator samples and, with a discriminator, its loss."""
        x_fake = self._train_sample(labels, grad=False)[0]
        b, sched = x_fake.shape[0], self.fake_score.schedule
        cond = self.fake_score.net.drop_cond(labels, self.fake_p_uncond, u=self.uniform(b, cond_device(labels)))
        t = self.per_sample(lambda n: sched.sample_t(n, device=x_fake.device), b)
        eps = self.noise_like(x_fake)
        scale = self.fake_train_scale  # SiD-LSG's kappa_1 (1: the plain denoising loss, DMD Eq. 6)
        loss = (fake_score_loss(self.fake_score, x_fake, cond, t, eps) if scale == 1.0 else
                guided_denoising_loss(self.fake_score, x_fake, cond, t, eps, scale))
        terms = {"fake_score": loss.mean()}
        if self.disc_head is not None:
            terms["discriminator"] = self._discriminator_loss(x_fake, x_real, labels)
        return terms

    def generator_losses(self, labels: Any, requests: Any = None) -> dict[str, Tensor]:
        """The generator's distribution-matching term (DMD, f-distill, Decoupled DMD or SiD) and GAN term for the
        condition `labels` of `requests` (the batch's class ids or prompts; default `labels`: class ids)."""
        x, step = self._train_sample(labels, grad=True)
        b, dev, sched = x.shape[0], x.device, self.generator.schedule
        w = self._scales(b, dev)
        terms = {}
        if self.objective.kind == "dmd":
            t = self._uniform_t(b, self.dmd_t_range, dev)
            x_t = sched.add_noise(x.detach(), self.noise_like(x), t)
            d_real = self.dm_target(x_t, t, labels, w, requests)
            d_fake = self._fake_x0(x_t, t, labels, w)
            if self.divergence == "reverse_kl":
                terms["dmd"] = dmd_loss(x, d_real, d_fake).mean()
            else:
                with torch.no_grad():
                    logits = self._disc_logits(x_t, t, labels)
                terms["dmd"] = self._fdistill_loss(x, d_real, d_fake, logits, t).mean()
        elif self.objective.kind == "sid":
            terms["sid"] = self._sid_loss(x, labels, w).mean()
        else:
            terms["dmd"] = self._decoupled_loss(x, labels, w, float(self.generator_times[step])).mean()
        if self.gan_weight > 0:
            terms["generator_gan"] = self._generator_gan_loss(x, labels, requests)
        return terms

    def _fdistill_loss(self, x: Tensor, d_real: Tensor, d_fake: Tensor, logits: Tensor, t: Tensor) -> Tensor:
        """f-distill's loss [B]: the DMD loss with g weighted by h(r) normalised as objective.ratio_normalization says
        (two_stage: Xu et al.'s, updating the per-bin running mean of r, `ratio_ema`)."""
        scheme, bins, rate = self.ratio_scheme
        if scheme == "two_stage" and bins > 0:
            weights, ema = two_stage_weights(self.divergence, logits, t, self.ratio_ema, rate, self.global_batch)
            self.ratio_ema.copy_(ema)
            return dmd_loss(x, d_real, d_fake, weight=weights)
        return fdistill_loss(x, d_real, d_fake, logits, self.divergence, t, bins, self.global_batch)

    # --- the DMD term's target -----------------------------------------------------------------------
    def dm_target(self, x_t: Tensor, t: Tensor, labels: Any, w: Tensor, requests: Any = None) -> Tensor:
        """D_real of the DMD term, x0 [B, C, H, W], at (x_t [B, C, H, W], t [B]) for the condition `labels` [B] of
        `requests` (the batch's class ids or prompts; default: `labels`, class ids) and scales w [B]: the guided
        teacher's prediction (DMD Eq. 7) or, with `forget`, SFD's target (onestep_forget.ScoreForgetting.sfd_target:
        forgotten requests get the target of their safe request or ESD's target, of the same frozen teacher)."""
        if self.forget is None:
            return teacher_target(self._guided["teacher"], x_t, t, labels, w, space="x0")
        return self.sfd_target(x_t, t, labels, w, requests)

    # --- optimisation --------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x_real, requests = batch
        labels = self.encode(requests)
        opts = self.optimizers()
        scheds = self.lr_schedulers()
        opt_g, opt_f = opts[0], opts[1]
        nets = [self.fake_score.trainable_parameters()] + ([list(self.disc_head.parameters())] if self.disc_head is not None else [])
        aux = [(opt_f, scheds[1])] + ([(opts[2], scheds[2])] if self.disc_head is not None else [])
        for _ in range(self.fake_args.updates):
            with self._updating(nets):
                terms = self.fake_losses(x_real, labels)
                ok = self._backward(terms, [o for o, _ in aux], nets, "fake score")
            if ok:
                for opt, sched in aux:
                    self._aux_step(opt)
                    sched.step()
        with self._updating([self._generator_weights]):
            terms = self.generator_losses(labels, requests)
            ok = self._backward(terms, [opt_g], [self._generator_weights], "generator")
            if ok:
                opt_g.step()  # the only LightningOptimizer step: advances trainer.global_step
                scheds[0].step()
                if self.ema is not None:
                    self.ema.update(self.generator.net)
        self.nonfinite_guard.count("generator", ok)
        self.log("train/skipped_updates", float(len(self.nonfinite_guard.skipped)))

    def validation_step(self, batch, batch_idx):
        """val/fake_score: the fake score's denoising loss on real validation digits (fixed t and noise):
        how far the fake score has moved from the data (the teacher's fit)."""
        x0, requests = batch
        if x0 is None:  # prompt-only data (data.prompts.PromptDataModule): no real latents to score
            return
        labels = self.encode(requests)
        gen = torch.Generator(device=x0.device).manual_seed(1000 + batch_idx)
        t = self.fake_score.schedule.sample_t(x0.shape[0], generator=gen, device=x0.device)
        eps = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        self.log("val/fake_score", fake_score_loss(self.fake_score, x0, labels, t, eps).mean())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY]["generator_steps"] = self.generator_steps


def _keep_missing_ratio_ema(module, state_dict, prefix, *args) -> None:
    """A checkpoint written before f-distill's two-stage normalisation has no `ratio_ema`: it starts from its initial
    value (ones) instead of failing to load."""
    state_dict.setdefault(prefix + "ratio_ema", module.ratio_ema.detach().clone())
