"""Concept erasure for class-conditional and text-to-image models: fine-tune a copy of a trained model so that chosen
concepts (classes, prompts) no longer appear (ESD, ANT, erase-toward), with preservation terms and parameter
selection (ESD-x/-u, LoRA, SalUn)."""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor

from data.steps import ErasureSteps
from guidance.conditions import cond_cat, cond_device, cond_index
from guidance.denoiser import Denoiser
from guidance.guided import GuidedDenoiser
from guidance.guiders import CFG
from losses.erasure import (ant_early_target, ant_target, esd_target, preservation_target, regression_loss,
                            toward_target, windowed)
from models.ema import EMA
from models.param_select import SELECTIONS, SaliencyMask, add_lora, select_parameters
from train.methods.base import MethodModule
from train.methods.erasure_concepts import ErasureConcepts, resolve_concepts
from train.methods.erasure_samples import X_T_SOURCES, ErasureSamples, Group
from train.methods.trajectories import TrajectoryBank
from train.runtime.checkpoint import load_teacher
from train.runtime.optim import adamw_with_warmup

SAMPLING = ("one", "all")
TERMS = ("erase", "erase_early", "anchor", "uncond", "uncond_early")
LOSS_SPACES = ("eps", "x0", "v", "flow")


class ConceptErasure(ErasureSamples, MethodModule):
    """Concept erasure: the student (a copy of the frozen model) regresses erasure targets built by the guidance core
    on the frozen model, plus preservation terms. Works on any model whose conditioner turns requests into conditions
    (class ids or names of a class-conditional model, prompts of a text-to-image one).

    Randomness: the erased request of a step ("one") is one draw shared by every process; everything else (concepts
    with "all", anchors, t or the trajectory step, trajectories, noise) is drawn per sample through
    MethodModule.per_sample, so a run on W processes x batch_size equals one process x W batch_size, draw for draw.
    Where x_t comes from: train.methods.erasure_samples.ErasureSamples.

    model:            the model to erase: a teacher checkpoint (runs/.../checkpoints/last.ckpt) or a diffusers
                      pipeline folder.
    concepts:         what to erase: a concept spec (data.concepts: a YAML path, or the mapping {concepts: [{name,
                      prompts | classes, alternative}], anchors: [...]}), or the list of concepts alone (`[3, 7]`,
                      `["a cat"]`); a concept may have several requests (prompts).
    targets:          erase toward these requests, one per concept (All but One, arXiv 2312.12807; shorthand for each
                      concept's `alternative`) instead of ESD's negative guidance (Gandikota et al. 2023, arXiv
                      2303.07345).
    eta:              ESD negative-guidance strength: the target is the frozen model guided at w = -eta.
    x_t_source:       with step batches (data.steps.ErasureSteps): "student", ESD's x_t (sec. 4 and the authors'
                      train-esd script): the fine-tuned network's own CFG DDIM trajectory at `trajectory_scale` from
                      fresh noise, stopped at a grid step uniform in 0 .. trajectory_steps - 1, targets read at that
                      step's time; "frozen_bank": the frozen model's trajectories, cached once (`bank_size` per
                      request, rebuilt every `bank_refresh` steps) and jumped to t from the training distribution:
                      faster, and what this project did first. Data batches bring their own x_t (noised samples).
    trajectory_steps, trajectory_scale: DDIM steps and CFG scale of those trajectories (ESD: 50 and 3, the
                      `ddim_steps` and `start_guidance` of the authors' script).
    ant_steps:        ANT ("Set You Straight", arXiv 2504.12782; authors' code `before_step` 7 of 50): the first
                      ant_steps of the trajectory_steps grid steps are the early stage. Each step trains one early
                      group (x_t after 0 .. ant_steps - 1 steps; target: the frozen model guided at w = +eta,
                      e_0 + eta (e_p - e_0)) and one late group (ant_steps .. steps - 1; ESD's target), from one
                      start noise; the null-condition term is read at both groups' x_t. None: no ANT stages.
    early_weight:     ANT's alpha_1: weight of the early stage (its erase and null-condition terms); 1 in the paper.
    t_window:         ANT by time instead of by step: erase at t <= t_window, the early-stage target above it, at
                      whatever t x_t comes with (any x_t source, data batches too). None: off. Not with ant_steps.
    early_scale:      guidance scale of the early-stage target (ant_steps or t_window): None = +eta (ANT); 1 = the
                      frozen conditional prediction (this project's target before; the same at eta = 1).
    toward_scale:     guidance scale of the toward target (1: the plain frozen prediction for the alternative).
    toward_away:      use the erased request as the negative condition of the toward target.
    anchors:          requests whose predictions stay the frozen ones (SPM anchoring, arXiv 2312.16145; shorthand for
                      the spec's anchors); None: every class not erased when the conditioner can list its requests,
                      none for prompts; []: none. Their x_t come from trajectories at their own requests.
    anchor_weight:    weight of the anchor term; uncond_weight: of the null-condition term (All but One; ANT's
                      alpha_2), None: 0.5 with ant_steps (ANT), else 1. ESD itself has neither term.
    concept_sampling: "one" (one erased request per step; with data batches, its concept's samples) or "all" (each
                      sample draws its request; with data batches, every erased concept's samples).
    params:           trainable parameters: esd-x (class embedding / cross-attention), esd-u (the rest), all, lora
                      (adapters on every linear/conv layer, rank `lora_rank`, scale lora_alpha / rank; rank 1 = SPM's
                      one-dimensional adapters).
    saliency_top_k:   SalUn (arXiv 2310.12508): update only this fraction of the selected weights, the largest
                      |grad| of the erasure loss over `saliency_batches` batches at the start. None: off.
    batch_size:       samples per term per step with step batches (data.steps.ErasureSteps); with a data module
                      (labelled images, captioned images) x_t comes from its batches.
    loss_space:       space of the regression: eps (ESD, Eq. 6: the paper's loss, whatever the network predicts; the
                      predictions are converted, not retrained), x0, v, flow; None: the network's parameterisation
                      (before: for a v network that weighs each t by 1 / alpha^2 against eps).
    lr, weight_decay, warmup_steps: AdamW; ema_decay: EMA of the student used for sampling (0: off).
    val_scale, val_steps: CFG scale and steps of validation samples; val_samples: samples per erased class of
                      `val/erased_rate`, which train.evaluation.callbacks.SampleMetrics logs (0: off).
    model_config:     the frozen model's config, filled in automatically, so a self-contained checkpoint (one that
                      holds the frozen weights, train.runtime.frozen) rebuilds even when `model` has moved.
    nonfinite, max_skips: what a NaN/inf loss term or gradient does: "skip" the update or "stop" (train.runtime.nonfinite).
    """

    method_name = "erasure"

    def __init__(self, model: str, concepts: str | dict | list, targets: list | None = None, eta: float = 1.0,
                 x_t_source: str = "student", trajectory_steps: int = 50, trajectory_scale: float = 3.0,
                 ant_steps: int | None = None, early_weight: float = 1.0, t_window: float | None = None,
                 early_scale: float | None = None, toward_scale: float = 1.0, toward_away: bool = False,
                 anchors: list | None = None, anchor_weight: float = 1.0, uncond_weight: float | None = None,
                 concept_sampling: str = "one", params: str = "esd-x", lora_rank: int = 1,
                 lora_alpha: float | None = None, saliency_top_k: float | None = None, saliency_batches: int = 4,
                 batch_size: int = 32, bank_size: int = 128, bank_refresh: int = 0, loss_space: str | None = "eps",
                 lr: float = 1e-4, weight_decay: float = 0.0, warmup_steps: int = 0, ema_decay: float = 0.0,
                 val_scale: float = 2.0, val_steps: int = 20, val_samples: int = 50,
                 model_config: dict | None = None, nonfinite: str = "skip", max_skips: int = 10):
        super().__init__(nonfinite, max_skips)
        self.save_hyperparameters()
        _check_options(eta, t_window, concept_sampling, params, saliency_top_k, weight_decay, batch_size, loss_space)
        _check_sampling(x_t_source, trajectory_steps, trajectory_scale, ant_steps, early_weight, t_window, bank_refresh)
        frozen = self._load_frozen(model, model_config)
        self.spec: ErasureConcepts = resolve_concepts(concepts, targets, anchors, frozen.net.conditioner)
        self._make_student(frozen, params, lora_rank, lora_alpha, ema_decay)
        self.num_trainable = sum(p.numel() for p in self.trainable)
        self.saliency = SaliencyMask(self.trainable) if saliency_top_k is not None else None
        self.eta, self.t_window, self.toward_scale, self.toward_away = eta, t_window, toward_scale, toward_away
        self.x_t_source, self.trajectory_steps, self.trajectory_scale = x_t_source, trajectory_steps, trajectory_scale
        self.ant_steps, self.early_weight, self.early_scale = ant_steps, early_weight, early_scale
        if uncond_weight is None:
            uncond_weight = 0.5 if ant_steps is not None else 1.0  # ANT's alpha_2 (authors' configs)
        self.anchor_weight, self.uncond_weight, self.concept_sampling = anchor_weight, uncond_weight, concept_sampling
        self.saliency_top_k, self.saliency_batches, self.batch_size = saliency_top_k, saliency_batches, batch_size
        self.bank_refresh, self.space = bank_refresh, loss_space or frozen.parameterization
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.val_scale, self.val_steps, self.val_samples = val_scale, val_steps, val_samples
        self._bank_args = (trajectory_steps, trajectory_scale, bank_size)
        self.bank: TrajectoryBank | None = None
        self._conds: dict[str, Any] = {}  # key -> condition [1] of the spec's requests, encoded once
        key = self.conditioner.key
        self._alternative = {key(r): a for rs, a in zip(self.spec.requests, self.spec.alternatives) for r in rs}
        self._concept_keys = [{key(r) for r in rs} for rs in self.spec.requests]
        self._anchor_keys = {key(a) for a in self.spec.anchors}

    # --- construction ----------------------------------------------------------------------------
    def _load_frozen(self, model: str, model_config: dict | None) -> Denoiser:
        """The frozen model's Denoiser (a teacher checkpoint's sampling network, or a pipeline folder's network),
        registered as read from `model` (MethodModule.register_frozen: left out of checkpoints); its config is
        recorded as hparams["model_config"]."""
        try:
            frozen, config, unread = load_teacher(model, model_config)
        except FileNotFoundError:
            raise ValueError(f"model={model!r} does not exist; pass the model to erase as --model.init_args.model: a "
                             f"teacher checkpoint written by `python -m train fit` (e.g. "
                             f"runs/digits-teacher/checkpoints/last.ckpt) or a diffusers pipeline folder") from None
        self.hparams["model_config"] = config
        self.register_frozen(frozen.net, model, unread)
        return frozen

    def _make_student(self, frozen: Denoiser, params: str, lora_rank: int, lora_alpha: float | None,
                      ema_decay: float) -> None:
        """`frozen`, and `student`: a copy of it training the weights selected by `params` (models.param_select),
        EMA'd when ema_decay > 0."""
        self.frozen = frozen.requires_grad_(False).eval()
        self.student = Denoiser(copy.deepcopy(frozen.net), frozen.schedule, frozen.parameterization, frozen.sigma_data)
        self.student.requires_grad_(True)
        self.trainable_names = (add_lora(self.student.net, lora_rank, lora_alpha) if params == "lora"
                                else select_parameters(self.student.net, params))
        self.trainable = [p for p in self.student.net.parameters() if p.requires_grad]
        self.ema = EMA(self.student.net, ema_decay) if ema_decay > 0 else None

    # --- what is erased ----------------------------------------------------------------------------
    def erased_requests(self) -> list:
        """Every erased request (class ids of a class model, prompts of a text model), concept by concept."""
        return [r for r, _ in self.spec.erased]

    def concept_names(self) -> list[str]:
        return list(self.spec.names)

    # --- x_t and conditions ------------------------------------------------------------------------
    def _bank(self) -> TrajectoryBank:
        """The trajectory bank, rebuilt every `bank_refresh` steps: generation global_step // bank_refresh."""
        if self.bank is None:
            progress = self._trainer is not None and self.trainer.is_global_zero and \
                self.trainer.progress_bar_callback is not None
            self.bank = TrajectoryBank(GuidedDenoiser(self.frozen, CFG()), self.conditioner, self.sample_shape(),
                                       *self._bank_args, progress=progress)
        generation = self.global_step // self.bank_refresh if self.bank_refresh > 0 else 0
        if generation != self.bank.generation:
            self.bank.banks.clear()
            self.bank.generation = generation
        return self.bank

    def _condition(self, requests: list) -> Any:
        """The condition [n] of n canonical requests of the concept set (erased, alternatives, anchors, null), each
        encoded once (alone) and reused; other requests are encoded together."""
        keys = [self.conditioner.key(r) for r in requests]
        unique = dict(zip(keys, requests))
        cached = next(iter(self._conds.values()), None)
        if cached is not None and cond_device(cached) != self.device:
            self._conds.clear()
        for k, r in unique.items():
            if k not in self._conds:
                self._conds[k] = self.encode([r])
        rows = cond_cat([self._conds[k] for k in unique])
        pos = {k: i for i, k in enumerate(unique)}
        return cond_index(rows, torch.tensor([pos[k] for k in keys], device=self.device))

    def _weight(self, term: str) -> float:
        """The weight of a term's mean loss. With ANT stages the total is ANT's L_late + alpha_2 U_late
        + alpha_1 (L_early + alpha_2 U_early) (authors' code; alpha_1 = early_weight, alpha_2 = uncond_weight), plus
        this project's anchor term."""
        return {"erase": 1.0, "erase_early": self.early_weight, "anchor": self.anchor_weight,
                "uncond": self.uncond_weight, "uncond_early": self.early_weight * self.uncond_weight}[term]

    # --- targets and losses ------------------------------------------------------------------------
    def _target(self, group: Group) -> Tensor:
        if group.term == "erase":
            return self.erase_target(group.x_t, group.t, group.requests, group.cond)
        if group.term == "erase_early":
            return self.early_target(group.x_t, group.t, group.requests, group.cond)
        return preservation_target(self.frozen, group.x_t, group.t, group.cond, self.space)  # the frozen prediction

    def erase_target(self, x_t: Tensor, t: Tensor, requests: list, cond: Any = None) -> Tensor:
        """The erasure target [n, C, H, W] (in the loss space) of erased requests at x_t [n, C, H, W], t [n]: ESD's
        (the frozen model guided at w = -eta; with t_window, the early-stage target above it) for concepts without an
        alternative, the toward target for the others. cond: the requests' condition (default: encoded here)."""
        cond = self._condition(requests) if cond is None else cond
        alts = [self._alternative[self.conditioner.key(r)] for r in requests]
        toward = torch.tensor([a is not None for a in alts], device=x_t.device)
        if not bool(toward.any()):
            return self._esd(x_t, t, cond)
        if bool(toward.all()):
            return self._toward(x_t, t, cond, alts)
        out = torch.empty_like(x_t, dtype=torch.promote_types(x_t.dtype, torch.float32))
        out[~toward] = self._esd(x_t[~toward], t[~toward], cond_index(cond, ~toward)).to(out.dtype)
        out[toward] = self._toward(x_t[toward], t[toward], cond_index(cond, toward),
                                   [a for a in alts if a is not None]).to(out.dtype)
        return out

    def early_target(self, x_t: Tensor, t: Tensor, requests: list, cond: Any = None) -> Tensor:
        """ANT's early-stage target [n, C, H, W] for erased requests (every concept, erased toward an alternative or
        not): the frozen model guided at w = +eta (arXiv 2504.12782; e_0 + eta (e_p - e_0)), or at early_scale; 1 is
        the frozen conditional prediction."""
        cond = self._condition(requests) if cond is None else cond
        if self.early_scale == 1:
            return preservation_target(self.frozen, x_t, t, cond, self.space)
        w = self.eta if self.early_scale is None else self.early_scale
        return ant_early_target(self.frozen, x_t, t, cond, w, self.space)

    def _esd(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        if self.t_window is None:
            return esd_target(self.frozen, x_t, t, cond, self.eta, self.space)  # ESD Eq. 6
        return ant_target(self.frozen, x_t, t, cond, self.eta, self.t_window, self.space, early_scale=self.early_scale)

    def _toward(self, x_t: Tensor, t: Tensor, cond: Any, alts: list) -> Tensor:
        target = toward_target(self.frozen, x_t, t, self._condition(alts), self.toward_scale, self.space,
                               source_cond=cond if self.toward_away else None)
        if self.t_window is None:
            return target
        return windowed(target, self.early_target(x_t, t, [], cond), t, self.t_window)

    def losses(self, batch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Mean loss per term (erase, anchor, uncond; with ANT stages erase_early and uncond_early too) for one
        batch; one student forward for all terms."""
        groups = self._groups(batch, generator)
        if not groups:
            return {}
        x_t, t = torch.cat([g.x_t for g in groups]), torch.cat([g.t for g in groups])
        pred = self.student(x_t, t, cond_cat([g.cond for g in groups])).read(self.space)
        out, i = {}, 0
        for g in groups:
            out[g.term] = regression_loss(pred[i:i + len(g.x_t)], self._target(g)).mean()
            i += len(g.x_t)
        return out

    # --- the erased model --------------------------------------------------------------------------
    def sampling_denoiser(self) -> Denoiser:
        if self.ema is None:
            return self.student
        return Denoiser(self.ema.module, self.student.schedule, self.student.parameterization, self.student.sigma_data)

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()  # the frozen model never leaves eval mode (dropout, norms)
        if self.ema is not None:
            self.ema.module.eval()
        return self

    # --- training --------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        terms = self.losses(batch)
        loss = sum(self._weight(k) * v for k, v in terms.items())
        if not terms:  # a data batch without any relevant sample: nothing to learn from, keep the graph valid
            loss = sum(p.sum() * 0 for p in self.trainable)
        for k, v in terms.items():
            self.log(f"train/{k}", v)
        self.log("train/loss", loss, prog_bar=True)
        self.record_terms(terms)
        return loss

    def validation_step(self, batch, batch_idx):
        gen = torch.Generator().manual_seed(1000 + batch_idx)  # the same x_t every validation
        for k, v in self.losses(batch, gen).items():
            self.log(f"val/{k}", v.detach())

    def on_update(self):
        if self.ema is not None:
            self.ema.update(self.student.net)

    def trainable_networks(self):
        return {"student.net": self.student.net}

    def configure_optimizers(self):
        return adamw_with_warmup(self.trainable, self.lr, self.weight_decay, self.warmup_steps)

    def on_train_start(self) -> None:
        if self.saliency is not None and not bool(self.saliency.fitted):
            self._fit_saliency()
        if self.saliency is not None:
            self.saliency.attach()

    def _fit_saliency(self) -> None:
        """SalUn's saliency: |gradient of the erasure loss| summed over `saliency_batches` batches; keep the top-k%."""
        grads = [torch.zeros_like(p) for p in self.trainable]
        data = getattr(self._trainer, "datamodule", None)
        loader = data.train_dataloader() if data is not None and not isinstance(data, ErasureSteps) else None
        batches = iter(loader) if loader is not None else None
        for _ in range(self.saliency_batches):
            batch = torch.zeros(1)
            if batches is not None:
                batch = next(batches, None)
                if batch is None:  # fewer batches than saliency_batches: go round again
                    batches = iter(loader)
                    batch = next(batches)
                batch = [b.to(self.device) if isinstance(b, Tensor) else b for b in batch]
            loss = self.losses(batch).get("erase")
            if loss is None:
                continue
            for g, gp in zip(grads, torch.autograd.grad(loss, self.trainable, allow_unused=True)):
                if gp is not None:
                    g.add_(gp)
        self.saliency.fit(grads, self.saliency_top_k)


# --- helpers ---------------------------------------------------------------------------------------

def _check_options(eta, t_window, sampling, params, top_k, weight_decay, batch_size, space) -> None:
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (the target is guided at w = -eta), got {eta}")
    if t_window is not None and not 0 < t_window <= 1:
        raise ValueError(f"t_window must be in (0, 1] (erase at t <= t_window) or null, got {t_window}")
    if sampling not in SAMPLING:
        raise ValueError(f"concept_sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")
    if params not in SELECTIONS:
        raise ValueError(f"params must be one of {', '.join(SELECTIONS)}, got {params!r}")
    if top_k is not None and not 0 < top_k <= 1:
        raise ValueError(f"saliency_top_k is a fraction in (0, 1] (or null to disable), got {top_k}")
    if top_k is not None and weight_decay != 0:
        raise ValueError("saliency_top_k needs weight_decay: 0 (AdamW would decay the masked weights)")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if space is not None and space not in LOSS_SPACES:
        raise ValueError(f"loss_space must be eps (ESD), x0, v, flow or null (the network's parameterisation), "
                         f"got {space!r}")


def _check_sampling(source, steps, scale, ant_steps, early_weight, t_window, bank_refresh) -> None:
    if source not in X_T_SOURCES:
        raise ValueError(f"x_t_source must be one of {', '.join(X_T_SOURCES)} (student: ESD's on-policy x_t; "
                         f"frozen_bank: the frozen model's cached trajectories), got {source!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"trajectory_steps must be a positive integer (the DDIM grid x_t is drawn on), got {steps!r}")
    if not math.isfinite(scale):
        raise ValueError(f"trajectory_scale must be a finite guidance scale, got {scale}")
    if bank_refresh and source != "frozen_bank":
        raise ValueError(f"bank_refresh={bank_refresh} rebuilds the frozen trajectory bank: set x_t_source: "
                         f"frozen_bank, or bank_refresh: 0 (x_t_source: student samples fresh trajectories every step)")
    if ant_steps is not None:
        if not isinstance(ant_steps, int) or not 1 <= ant_steps < steps:
            raise ValueError(f"ant_steps must be a step count in 1..{steps - 1} (the early stage: the first ant_steps "
                             f"of trajectory_steps={steps}; ANT: 7 of 50), got {ant_steps!r}")
        if t_window is not None:
            raise ValueError("give ant_steps (ANT's stages by grid step) or t_window (by time), not both")
    if early_weight < 0:
        raise ValueError(f"early_weight (ANT's alpha_1) must be >= 0, got {early_weight}")
