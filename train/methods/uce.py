"""Closed-form concept erasure: Unified Concept Editing (UCE, Gandikota et al. 2024, arXiv 2308.14761) edits the
cross-attention key and value projections of a text-to-image UNet in one least-squares solve (losses.uce), with no
training loop: seconds instead of an hour, LoRA-free, exported like the other erased models."""
from __future__ import annotations

import copy

import torch
from torch import nn

from guidance.denoiser import Denoiser
from losses.uce import uce_weight
from train.methods.base import MethodModule
from train.methods.erasure_concepts import ErasureConcepts, load_prompt_model, resolve_concepts


def cross_attention_projections(net: nn.Module) -> dict[str, nn.Linear]:
    """{name: layer} of every cross-attention key and value projection (`attn2.to_k`, `attn2.to_v`) of a text UNet
    (SD 1.x/2.x, SDXL): the layers UCE edits, as the authors' code selects them."""
    layers = {n: m for n, m in net.named_modules()
              if isinstance(m, nn.Linear) and ".attn2." in f".{n}" and n.endswith(("to_k", "to_v"))}
    if not layers:
        raise ValueError("UCE edits the cross-attention key/value projections (attn2.to_k, attn2.to_v) of a text UNet "
                         "(SD 1.x/2.x, SDXL); this network has none. For class-conditional models and SD3/Flux use "
                         "train.methods.erasure.ConceptErasure")
    return layers


class ClosedFormErasure(MethodModule):
    """UCE: the student is a copy of the model whose cross-attention to_k / to_v weights are replaced by UCE's
    closed-form solution (losses.uce.uce_weight) once, at the run's single step (trainer.max_steps: 1), so the
    checkpoint, `sample`, `evaluate` and `export` treat it as any erased model.

    model:          the model to edit: a diffusers pipeline folder of SD 1.x/2.x or SDXL, or a text teacher checkpoint.
    concepts:       what to erase, as for ConceptErasure (data.concepts: a spec path or mapping, or a list of prompts);
                    every prompt of a concept is one erased embedding (its last word token's).
    targets:        the guide of each concept (one prompt per concept: its outputs replace the concept's); default:
                    each concept's `alternative` in the spec, else the empty prompt (UCE's guide for objects).
    anchors:        prompts whose outputs are preserved (UCE's preserve concepts; shorthand for the spec's anchors).
    erase_scale, preserve_scale, lamb: the weights of UCE's three terms (authors' defaults 1, 1, 0.5).
    val_scale, val_steps: CFG scale and steps of validation samples; val_samples: as ConceptErasure's.
    model_config:   the model's config, filled in automatically (the checkpoint rebuilds when `model` has moved).
    """

    method_name = "uce"

    def __init__(self, model: str, concepts: str | dict | list, targets: list | None = None,
                 anchors: list | None = None, erase_scale: float = 1.0, preserve_scale: float = 1.0,
                 lamb: float = 0.5, val_scale: float = 2.0, val_steps: int = 20, val_samples: int = 50,
                 model_config: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        if erase_scale < 0 or preserve_scale < 0 or lamb <= 0:
            raise ValueError(f"erase_scale and preserve_scale must be >= 0 and lamb > 0, got {erase_scale}, "
                             f"{preserve_scale}, {lamb}")
        frozen, config = load_prompt_model(model, model_config, "SD 1.x/2.x, SDXL",
                                           "UCE edits how prompts enter cross-attention")
        self.hparams["model_config"] = config
        self.frozen = frozen
        conditioner = frozen.net.conditioner
        self.spec: ErasureConcepts = resolve_concepts(concepts, targets, anchors, conditioner)
        self.student = Denoiser(copy.deepcopy(frozen.net), frozen.schedule, frozen.parameterization, frozen.sigma_data)
        self.student.requires_grad_(False)
        self.layers = cross_attention_projections(self.student.net)
        self.erase_scale, self.preserve_scale, self.lamb = erase_scale, preserve_scale, lamb
        self.val_scale, self.val_steps, self.val_samples = val_scale, val_steps, val_samples
        self.register_buffer("edited", torch.zeros((), dtype=torch.bool))
        self.automatic_optimization = False

    # --- what is erased ----------------------------------------------------------------------------
    def erased_requests(self) -> list:
        return [r for r, _ in self.spec.erased]

    def concept_names(self) -> list[str]:
        return list(self.spec.names)

    def sampling_denoiser(self) -> Denoiser:
        return self.student

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()
        return self

    # --- the edit --------------------------------------------------------------------------------
    @torch.no_grad()
    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(erase [n_e, D], guide [n_e, D], preserve [n_p, D]): the last-word-token embeddings of every erased prompt,
        of its concept's guide (the alternative, or the empty prompt), and of the anchors."""
        encoder = self.conditioner.encoder
        erased = self.spec.erased
        guides = [self.spec.alternatives[i] if self.spec.alternatives[i] is not None else self.conditioner.null_request
                  for _, i in erased]
        erase = encoder.last_word_embeddings([r for r, _ in erased])
        guide = encoder.last_word_embeddings(guides)
        anchors = list(self.spec.anchors)
        preserve = encoder.last_word_embeddings(anchors) if anchors else erase.new_zeros(0, erase.shape[1])
        return erase, guide, preserve

    def frozen_weights(self) -> dict[str, torch.Tensor]:
        """The frozen model's weight of every edited layer, by the layer's name."""
        frozen = dict(self.frozen.net.named_modules())
        return {name: frozen[name].weight for name in self.layers}

    @torch.no_grad()
    def apply_edit(self) -> None:
        """Replace every cross-attention to_k / to_v weight of the student by UCE's solution from the frozen model's."""
        erase, guide, preserve = self.embeddings()
        for layer, w_old in zip(self.layers.values(), self.frozen_weights().values()):
            dev = w_old.device
            layer.weight.copy_(uce_weight(w_old, erase.to(dev, w_old.dtype), guide.to(dev, w_old.dtype),
                                          preserve.to(dev, w_old.dtype), self.erase_scale, self.preserve_scale,
                                          self.lamb))
        self.edited.fill_(True)

    # --- the one step ------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.trainer.max_steps != 1:
            raise ValueError(f"UCE is one closed-form edit: set trainer.max_steps: 1 (got {self.trainer.max_steps})")

    def training_step(self, batch, batch_idx):
        if not bool(self.edited):
            self.apply_edit()
        frozen = self.frozen_weights()
        moved = max((layer.weight - frozen[n]).abs().max().item() for n, layer in self.layers.items())
        self.log("train/edited_layers", float(len(self.layers)))
        self.log("train/max_weight_change", moved)
        self.optimizers().step()  # no gradients: advances the step counter, so the checkpoint is written

    def validation_step(self, batch, batch_idx):
        return None

    def trainable_networks(self):
        return {}

    def configure_optimizers(self):
        return torch.optim.SGD([layer.weight for layer in self.layers.values()], lr=0.0)
