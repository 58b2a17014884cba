"""What the concept-erasure modules share (train.methods.erasure.ConceptErasure on class labels, train.methods.text_erasure.
TextConceptErasure on prompts): the frozen model and its trainable copy, the weighted loss terms, the optimizer."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from guidance.denoiser import Denoiser
from models.ema import EMA
from models.param_select import add_lora, select_parameters
from train.methods.base import MethodModule
from train.runtime.checkpoint import load_teacher
from train.runtime.optim import adamw_with_warmup


class ErasureMethod(MethodModule):
    """Base of the erasure modules.

    - `frozen`: the model to erase (eval mode, requires_grad off, never trained);
    - `student`: a trainable copy of it whose selected weights `trainable` (names `trainable_names`) train, with an
      optional EMA (`ema`) that is then what a user samples from;
    - loss terms 'erase', 'anchor', 'uncond' from the subclass's `losses(batch, generator)` ({term: mean loss}),
      weighted 1, `anchor_weight`, `uncond_weight`;
    - one AdamW over `trainable` (`lr`, `weight_decay`, `warmup_steps`).
    Subclasses call `_load_frozen` and `_make_student` in __init__ and set the weights and optimizer settings.
    """

    method_name = "erasure"
    anchor_weight: float = 1.0
    uncond_weight: float = 0.0

    # --- construction ----------------------------------------------------------------------------
    def _load_frozen(self, model: str, model_config: dict | None) -> Denoiser:
        """The frozen model's Denoiser (a teacher checkpoint's sampling network, or a pipeline folder's network);
        its config is recorded as hparams["model_config"], so the erased checkpoint rebuilds even when `model` has
        moved (its weights are in the checkpoint)."""
        try:
            frozen, config = load_teacher(model, model_config)
        except FileNotFoundError:
            raise ValueError(f"model={model!r} does not exist; pass the model to erase: a teacher checkpoint written "
                             f"by `python -m train fit` (e.g. runs/demo/teacher/checkpoints/last.ckpt) or a diffusers "
                             f"pipeline folder") from None
        self.hparams["model_config"] = config
        return frozen

    def _make_student(self, frozen: Denoiser, params: str, lora_rank: int, lora_alpha: float | None,
                      ema_decay: float) -> None:
        """`frozen`, and `student`: a copy of it training the weights selected by `params` (models.param_select:
        esd-x, esd-u, all; "lora": adapters of rank lora_rank on every linear/conv layer), EMA'd when ema_decay > 0."""
        self.frozen = frozen.requires_grad_(False).eval()
        self.student = Denoiser(copy.deepcopy(frozen.net), frozen.schedule, frozen.parameterization, frozen.sigma_data)
        self.student.requires_grad_(True)
        self.trainable_names = (add_lora(self.student.net, lora_rank, lora_alpha) if params == "lora"
                                else select_parameters(self.student.net, params))
        self.trainable = [p for p in self.student.net.parameters() if p.requires_grad]
        self.ema = EMA(self.student.net, ema_decay) if ema_decay > 0 else None

    # --- the erased model ------------------------------------------------------------------------
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
    def losses(self, batch: Any, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def _weight(self, term: str) -> float:
        return {"erase": 1.0, "anchor": self.anchor_weight, "uncond": self.uncond_weight}[term]

    def training_step(self, batch, batch_idx):
        terms = self.losses(batch)
        loss = sum(self._weight(k) * v for k, v in terms.items())
        if not terms:  # a data batch without any relevant label: nothing to learn from, keep the graph valid
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
