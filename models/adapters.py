"""Adapters over diffusers networks with one calling convention: net(x, t, cond) -> raw output.

x: [B, C, H, W] (already input-scaled by the Denoiser); t: [B] float network time (the schedule's
`net_time`, e.g. 0..999); cond: the network's condition, made from requests by its conditioner
(`net.conditioner`, models.conditioning: class ids here, text embeddings for the text adapters). Every adapter
also gives `null_cond(cond)` (the condition used for unconditional branches) and `drop_cond(cond, p)`
(classifier-free training: replace a random fraction p of conditions by the null condition, Ho & Salimans 2022,
arXiv 2207.12598, Algorithm 1), both its conditioner's, and `sample_shape()` (C, H, W of one sample).

Text-conditioned adapters (UNet2DConditionModel, SD3, Flux: models.text_unet, models.text_transformer) have the
same interface; the samplers, guiders and methods only ever use it.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from models.class_export import WHY_W_EMBEDDING_IS_SEPARATE, lora_contents, sampling_code, save_peft_adapter
from models.conditioning import NULL_LABEL, ClassConditioner, Conditioner
from models.diffusers_export import W_EMBEDDING_NOTE, export_scheduler, plain_network
from models.pag_attention import perturbed_self_attention

__all__ = ["NULL_LABEL", "ConditionalNetwork", "ClassConditionalUNet"]


class ConditionalNetwork(nn.Module):
    """Base class of every adapter: `forward(x, t, cond)`, its `conditioner`, `null_cond(cond)`, `drop_cond(cond, p)`,
    `sample_shape()`; `pretrained` (the pipeline folder it was loaded from, or None) and `vae_folder` (the folder
    whose vae/ maps its samples to images, or None for pixel-space networks)."""

    conditioner: Conditioner
    pretrained: str | None = None
    feature_layer: str = "unet.mid_block"  # the discriminator's default tap (models.discriminator)

    @property
    def vae_folder(self) -> str | None:
        return None

    def null_cond(self, cond: Any) -> Any:
        return self.conditioner.null(cond)

    def drop_cond(self, cond: Any, p: float, generator: torch.Generator | None = None, u: Tensor | None = None) -> Any:
        """cond with the condition of a random fraction p of samples replaced by the null condition; `u` [B]:
        the uniform draws to use (drop where u < p) instead of drawing them here."""
        return self.conditioner.drop(cond, p, generator, u)

    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample (a latent model's latents), from the network's config."""
        cfg = self.unet.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def describe(self) -> dict:
        """What an export records about the network (config for from_pretrained, condition kind)."""
        raise NotImplementedError

    # --- export: each adapter writes itself in the formats the ecosystem loads (train.export calls these) ---------
    # why a w-student's w-embedding is stored beside this network ({cls}: its diffusers class, {hooked}: the module
    # whose output it is added to, as the card's code names it)
    W_EMBEDDING_NOTE: str = W_EMBEDDING_NOTE

    def save_diffusers(self, folder: Path, schedule, parameterization: str, sampling: dict | None = None) -> dict:
        """Write what diffusers' from_pretrained loads into the existing empty `folder` (LoRA adapters merged, a
        scheduler whose steps equal the project's sampler for the recipe `sampling`, a Recipe.describe(): DDIM, or
        LCMScheduler for a latent consistency model); returns what guidedistill.json records about the files:
        "network" (the card code's expression for the diffusers network), "contents" (a sentence for the card) and
        what the card's code needs."""
        raise ValueError(f"{type(self).__name__} has no diffusers export; export --format safetensors instead")

    def save_lora(self, folder: Path, schedule, parameterization: str, base_checkpoint: str | None = None,
                  sampling: dict | None = None) -> dict:
        """Write this network's LoRA adapters for its base network into `folder` (what save_diffusers returns, plus
        "lora": rank and alpha); base_checkpoint: what the frozen base was loaded from; sampling: as save_diffusers."""
        raise ValueError(f"{type(self).__name__} has no LoRA export; export --format diffusers or safetensors instead")

    def card_code(self, meta: dict) -> str:
        """The model card's Python that samples the export (guidedistill.json's `meta`) with diffusers alone."""
        raise NotImplementedError

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward instead of storing them (the diffusers network's own gradient
        checkpointing; used by the DeepSpeed strategy's activation_checkpointing)."""
        unet = getattr(self, "unet", None)
        if unet is None or not hasattr(unet, "enable_gradient_checkpointing"):
            raise ValueError(f"{type(self).__name__} wraps no diffusers network with gradient checkpointing")
        unet.enable_gradient_checkpointing()


class ClassConditionalUNet(ConditionalNetwork):
    """diffusers `UNet2DModel` with class labels; label -1 is the null (unconditional) class.

    The null class is an extra row of the class embedding (index num_classes), so a checkpoint
    loads into a plain `UNet2DModel(num_class_embeds=num_classes + 1)` and samples there with
    class_labels = num_classes for the unconditional branch.

    num_classes:        number of real classes (digits: 10).
    sample_size:        image side in pixels (digits: 8).
    in_channels:        image channels; out_channels defaults to the same.
    block_out_channels: channels per resolution level (one level per entry; the last does not downsample).
    attention_levels:   which levels use self-attention blocks.
    layers_per_block:   ResNet blocks per level.
    norm_num_groups:    GroupNorm groups (must divide every channel count).
    dropout:            dropout in the ResNet blocks.
    pag_layers:         the self-attention layers `forward(..., perturb="pag")` perturbs (perturbed-attention
                        guidance, guidance.guiders.PAG), as patterns of module names
                        (models.pag_attention.pag_layer_modules); default the mid block's.
    class_names:        one name per class (requests may name their class); None: the ids are the names.
    """

    def __init__(self, num_classes: int = 10, sample_size: int = 8, in_channels: int = 1,
                 out_channels: int | None = None, block_out_channels: tuple[int, ...] = (64, 128, 128),
                 attention_levels: tuple[bool, ...] = (False, True, True), layers_per_block: int = 2,
                 norm_num_groups: int = 32, dropout: float = 0.0, pag_layers: Sequence[str] = ("mid",),
                 class_names: Sequence[str] | None = None):
        super().__init__()
        from diffusers import UNet2DModel

        block_out_channels, attention_levels = tuple(block_out_channels), tuple(attention_levels)
        if len(attention_levels) != len(block_out_channels):
            raise ValueError(f"attention_levels ({len(attention_levels)}) must have one entry per level of "
                             f"block_out_channels ({len(block_out_channels)})")
        bad = [c for c in block_out_channels if c % norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={norm_num_groups} must divide every entry of block_out_channels; {bad} do not")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.pag_layers = num_classes, list(pag_layers)
        self.conditioner = ClassConditioner(num_classes, class_names)
        self.unet = UNet2DModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=out_channels or in_channels,
            block_out_channels=block_out_channels, layers_per_block=layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)),
            num_class_embeds=num_classes + 1, norm_num_groups=norm_num_groups, dropout=dropout,
            attention_head_dim=None if not any(attention_levels) else 32,
        )

    @classmethod
    def from_unet(cls, unet, pag_layers: Sequence[str] = ("mid",),
                  class_names: Sequence[str] | None = None) -> "ClassConditionalUNet":
        """Wrap an existing UNet2DModel (e.g. `UNet2DModel.from_pretrained(path)`) whose class embedding
        has num_classes + 1 rows (the last one the null class)."""
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj.num_classes, obj.pag_layers = unet.config.num_class_embeds - 1, list(pag_layers)
        obj.conditioner = ClassConditioner(obj.num_classes, class_names)
        obj.unet = unet
        return obj

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, perturb: str | None = None) -> Tensor:
        """perturb="pag": the pass with the self-attention maps of `pag_layers` replaced by the identity (PAG,
        Ahn et al. 2024, arXiv 2403.17377)."""
        if perturb not in (None, "pag"):
            raise NotImplementedError(f"ClassConditionalUNet implements the 'pag' perturbation only, not {perturb!r}")
        labels = torch.where(cond < 0, torch.full_like(cond, self.num_classes), cond)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        with perturbed_self_attention(self.unet, self.pag_layers) if perturb else nullcontext():
            return self.unet(x, t, class_labels=labels).sample

    W_EMBEDDING_NOTE = WHY_W_EMBEDDING_IS_SEPARATE

    def save_diffusers(self, folder: Path, schedule, parameterization: str, sampling: dict | None = None) -> dict:
        """unet/ (UNet2DModel.from_pretrained; LoRA adapters merged) and scheduler/ (DDIM, "trailing" spacing; a
        latent consistency model's LCMScheduler)."""
        scheduler = export_scheduler(schedule, parameterization, sampling)  # refuses what it cannot reproduce first
        plain_network(self).unet.save_pretrained(folder / "unet", safe_serialization=True)
        scheduler.save_pretrained(folder / "scheduler")
        return {"network": "unet", "contents": (
            f"`unet/`: a diffusers UNet2DModel (class labels 0..{self.num_classes - 1}, {self.num_classes} the null "
            f"class), `scheduler/`: the {type(scheduler).__name__} whose steps are the project's sampler's steps.")}

    def save_lora(self, folder: Path, schedule, parameterization: str, base_checkpoint: str | None = None,
                  sampling: dict | None = None) -> dict:
        """peft's adapter_config.json + adapter_model.safetensors for the base (teacher) UNet2DModel; a latent
        consistency model's LCMScheduler in scheduler/ too (the base's scheduler/ is the teacher's DDIM one)."""
        lcm = sampling is not None and sampling.get("recipe") == "consistency"
        scheduler = export_scheduler(schedule, parameterization, sampling) if lcm else None
        config = save_peft_adapter(self, folder)
        if scheduler is not None:
            scheduler.save_pretrained(folder / "scheduler")
        meta = {"lora": {"r": config.r, "lora_alpha": config.lora_alpha, "peft_type": "LORA",
                         "base_checkpoint": base_checkpoint}}
        return {**meta, "network": "unet", "contents": lora_contents(meta) + (
            " `scheduler/`: the LCMScheduler that samples it." if lcm else "")}

    def card_code(self, meta: dict) -> str:
        return sampling_code(meta)

    def describe(self) -> dict:
        return {"kind": "class", "diffusers_class": "UNet2DModel", "num_classes": self.num_classes,
                "class_names": self.conditioner.names, "null_class_label": self.num_classes,
                "config": dict(self.unet.config)}
