"""A text-to-image network whose prompts go through an edited (trainable) copy of its CLIP text encoder, while the
frozen network and the process's shared prompt encoder (models.conditioning.shared_prompt_encoder) stay untouched;
exported as the base pipeline folder with the edited `text_encoder/`."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.adapters import ConditionalNetwork
from models.conditioning import TextConditioner
from models.text_encoders import PromptEncoder, encode_clip

# CLIPTextModel parameter groups a text-encoder edit may train (Fuchi & Takagi 2024, arXiv 2405.07288; the authors'
# code, utils.freeze_and_unfreeze_text_encoder: "mlp-final-attn", every layer's MLP and the last layer's
# self-attention, is what train.py trains; "token-embedding" is this project's addition: the token embedding table)
TEXT_ENCODER_PARAMS = ("mlp-final-attn", "mlp-only", "attn-only", "mlp-attn", "all", "token-embedding")


def select_text_encoder_parameters(encoder: nn.Module, which: str) -> list[str]:
    """Set requires_grad on the `which` group of a transformers CLIPTextModel (TEXT_ENCODER_PARAMS), off elsewhere;
    returns the trainable parameter names."""
    if which not in TEXT_ENCODER_PARAMS:
        raise ValueError(f"text_encoder_params must be one of {', '.join(TEXT_ENCODER_PARAMS)}, got {which!r}")
    last = encoder.config.num_hidden_layers - 1

    def chosen(name: str) -> bool:
        mlp, attn = ".mlp.fc" in name, ".self_attn." in name
        return {"all": True, "mlp-only": mlp, "attn-only": attn, "mlp-attn": mlp or attn,
                "mlp-final-attn": mlp or (attn and f".layers.{last}." in name),
                "token-embedding": "embeddings.token_embedding." in name}[which]

    names = []
    for name, p in encoder.named_parameters():
        p.requires_grad_(chosen(name))
        if p.requires_grad:
            names.append(name)
    return names


class EditedTextConditioner(TextConditioner):
    """The base conditioner's prompts encoded by `text_encoder` (an edited copy of the base's CLIP text encoder) with
    the base's tokenizer, never cached (the encoder changes while it trains) and never written into the shared
    encoder's cache. The null condition is the edited encoder's "" (what the exported pipeline's CFG uses)."""

    def __init__(self, base: TextConditioner, text_encoder: nn.Module):
        super().__init__(base.text_keys, base.pretrained, base.encoder_settings, None, base.embedded_guidance, base.width)
        shared = base.encoder
        if shared.kind != "clip":
            raise ValueError(f"text-encoder unlearning edits the one CLIP text encoder of SD 1.x/2.x pipelines; this "
                             f"model's prompt encoder is {shared.kind!r} (for SDXL/SD3/Flux use "
                             f"train.methods.erasure.ConceptErasure or train.methods.uce.ClosedFormErasure)")
        trainable = {n for n, p in text_encoder.named_parameters() if p.requires_grad}
        self.prompts = PromptEncoder("clip", shared.tokenizers, [text_encoder], cache=False)
        for n, p in text_encoder.named_parameters():  # PromptEncoder freezes its encoders: restore the selection
            p.requires_grad_(n in trainable)

    @property
    def encoder(self) -> PromptEncoder:
        return self.prompts

    @property
    def null_embedding(self) -> dict[str, Tensor]:
        with torch.no_grad():
            return {k: v.detach().cpu() for k, v in self.prompts.null(1).items() if k in self.text_keys}

    def _null_rows(self, n: int, device=None, dtype=None) -> dict[str, Tensor]:
        return {k: v.to(device=device, dtype=dtype or v.dtype).expand(n, *v.shape[1:])
                for k, v in self.null_embedding.items()}

    def encode_trainable(self, prompts: list[str]) -> dict[str, Tensor]:
        """The text condition of `prompts` WITH gradients into the edited encoder ("" is encoded as "", which is the
        null condition here)."""
        hidden, _ = encode_clip(self.prompts.tokenizers[0], self.prompts.encoders[0], list(prompts))
        return {"encoder_hidden_states": hidden}


class EditedTextNetwork(ConditionalNetwork):
    """The frozen text network `base` (held, not registered: its weights are the owner's) conditioned through the
    registered `text_encoder`; everything else (forward, folders, shape, card) is the base's; null_cond / drop_cond use the edited
    conditioner. Its state dict is the
    text encoder's alone (`text_encoder.*`)."""

    def __init__(self, base: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder
        self._base = (base,)
        self.conditioner = EditedTextConditioner(base.conditioner, text_encoder)

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    @property
    def unet(self) -> nn.Module:
        return self.base.unet

    @property
    def pretrained(self) -> str | None:
        return self.base.pretrained

    @property
    def vae_folder(self) -> str | None:
        return self.base.vae_folder

    @property
    def vae_scale_factor(self) -> int:
        return self.base.vae_scale_factor

    @property
    def feature_layer(self) -> str:
        return self.base.feature_layer

    def sample_shape(self) -> tuple[int, int, int]:
        return self.base.sample_shape()

    def forward(self, x: Tensor, t: Tensor, cond: Any, **kwargs) -> Tensor:
        return self.base(x, t, cond, **kwargs)

    def describe(self) -> dict[str, Any]:
        return {**self.base.describe(), "text_encoder": "edited (text_encoder/ of the export)"}

    def save_diffusers(self, folder: Path, schedule, parameterization: str, sampling: dict | None = None) -> dict:
        """The base's pipeline folder (its unchanged UNet, VAE, tokenizer, scheduler) with text_encoder/ replaced by
        the edited encoder (transformers' save_pretrained, safetensors)."""
        info = self.base.save_diffusers(folder, schedule, parameterization, sampling=sampling)
        shutil.rmtree(folder / "text_encoder", ignore_errors=True)
        self.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        return {**info, "contents": f"A full pipeline folder: the edited `text_encoder/` with the unchanged UNet, "
                                    f"tokenizer and VAE of `{info['base_pipeline']}`."}

    def save_lora(self, *args, **kwargs) -> dict:
        raise ValueError("text-encoder unlearning trains the text encoder, not the UNet: there are no UNet LoRA weights "
                         "to export; export --format diffusers (the pipeline with its edited text_encoder/)")

    def card_code(self, meta: dict) -> str:
        return self.base.card_code(meta)
