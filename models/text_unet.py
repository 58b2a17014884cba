"""The text-conditioned UNet adapter: diffusers `UNet2DConditionModel` (Stable Diffusion 1.x/2.x, SDXL)
behind net(x, t, cond), with the empty-prompt embedding as the null condition."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Sequence

import torch
from torch import Tensor

from models.adapters import ConditionalNetwork
from models.conditioning import TextConditioner
from models.pag_attention import perturbed_self_attention
from models.pipeline_export import PipelineExport

TEXT_KEYS = ("encoder_hidden_states", "text_embeds")  # condition entries replaced by the null condition
# PAG's perturbed self-attention (Ahn et al. 2024, arXiv 2403.17377): the mid block's, diffusers'
# StableDiffusionPAGPipeline / StableDiffusionXLPAGPipeline default ("mid")
PAG_LAYERS = ("mid",)


class TextConditionalUNet(PipelineExport, ConditionalNetwork):
    """`UNet2DConditionModel` on latents with a text condition dict (models.text_encoders):

        cond = {"encoder_hidden_states": [B, L, D]}                                  SD 1.x / 2.x
        cond = {"encoder_hidden_states": [B, L, D], "text_embeds": [B, P],
                "time_ids": [B, 6] (optional)}                                       SDXL

    x: [B, C, h, w] latents; t: [B] float network time (0..999). Returns the UNet's raw output (eps or v,
    as its scheduler's prediction_type says). SDXL's micro-conditioning time_ids default to
    (H, W, 0, 0, H, W) with H, W = h, w times `vae_scale_factor`, as diffusers' SDXL pipeline does when
    no sizes are given (original size = target size = the generated size, no crop).

    Export (models.pipeline_export.PipelineExport): `save_diffusers` writes the base pipeline folder with this UNet,
    `save_lora` diffusers' LoRA file for it, `card_code` the StableDiffusion(XL)Pipeline code that samples either.

    Prompts become conditions through the folder's own tokenizers and text encoders (`conditioner`, a
    models.conditioning.TextConditioner: loaded when first needed, once per process); the null condition is
    the embedding of "" for SD 1.x/2.x, zeros for SDXL with force_zeros_for_empty_prompt. The module's state dict
    is exactly the diffusers UNet's (`unet.*`). `null_cond` keeps the condition's time_ids (diffusers' negative
    branch uses the same sizes).

    pretrained:       a local pipeline folder in diffusers layout (unet/, text_encoder/, tokenizer/, vae/);
                      the UNet loads from `subfolder`. Nothing is downloaded.
    subfolder:        where the UNet lives inside `pretrained`.
    dtype:            "float32", "float16" or "bfloat16": the UNet's weights (inputs are cast to it).
    vae_scale_factor: latent-to-pixel factor for the default SDXL time_ids (read from vae/ when None).
    text_encoder_dtype: the frozen text encoders' dtype ("bfloat16" halves their memory; None: as stored).
    pag_layers:       the self-attention (`attn1`) layers that `forward(..., perturb="pag")` perturbs
                      (perturbed-attention guidance, guidance.guiders.PAG): patterns of module names as diffusers'
                      PAG pipelines take them (models.pag_attention.pag_layer_modules); default the mid block's.
    """

    def __init__(self, pretrained: str, subfolder: str = "unet", dtype: str = "float32",
                 vae_scale_factor: int | None = None, pag_layers: Sequence[str] = PAG_LAYERS,
                 text_encoder_dtype: str | None = None):
        super().__init__()
        from diffusers import UNet2DConditionModel

        from models.pretrained import check_pipeline_folder, torch_dtype, vae_scale_factor_of

        root = check_pipeline_folder(pretrained, subfolder)
        unet = UNet2DConditionModel.from_pretrained(root, subfolder=subfolder, local_files_only=True,
                                                    torch_dtype=torch_dtype(dtype)).train()  # trainable, as a new module
        settings = {"dtype": torch_dtype(text_encoder_dtype)} if text_encoder_dtype else {}
        self._setup(unet, vae_scale_factor or vae_scale_factor_of(root), str(pretrained), settings, None, pag_layers)

    @classmethod
    def from_unet(cls, unet, null_cond: dict[str, Tensor], vae_scale_factor: int = 8,
                  pag_layers: Sequence[str] = PAG_LAYERS) -> "TextConditionalUNet":
        """Wrap an existing UNet2DConditionModel; null_cond: the null text condition with batch size 1
        (e.g. `PromptEncoder.null(1)`). Without a pipeline folder its conditioner cannot encode prompts."""
        obj = cls.__new__(cls)
        ConditionalNetwork.__init__(obj)
        obj._setup(unet, vae_scale_factor, None, {}, null_cond, pag_layers)
        return obj

    def _setup(self, unet, vae_scale_factor: int, pretrained: str | None, settings: dict,
               null_cond: dict[str, Tensor] | None, pag_layers: Sequence[str]) -> None:
        self.unet = unet
        self.pretrained, self.pag_layers = pretrained, list(pag_layers)
        self.vae_scale_factor = int(vae_scale_factor)
        self.sdxl = unet.config.addition_embed_type == "text_time"
        if self.sdxl and null_cond is not None and "text_embeds" not in null_cond:
            raise ValueError("an SDXL-style UNet (addition_embed_type='text_time') needs text_embeds in its null "
                             "condition: use a two-encoder PromptEncoder (kind 'sdxl')")
        self.conditioner = TextConditioner(TEXT_KEYS if self.sdxl else TEXT_KEYS[:1], pretrained, settings, null_cond,
                                           width=unet.config.cross_attention_dim)

    @property
    def vae_folder(self) -> str | None:
        return self.pretrained

    def _time_ids(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
        # diffusers SDXL pipeline, _get_add_time_ids: original_size + crops_coords_top_left + target_size
        return torch.tensor([h, w, 0, 0, h, w], dtype=x.dtype, device=x.device).expand(x.shape[0], 6)

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], perturb: str | None = None) -> Tensor:
        """perturb="pag": the pass with the self-attention maps of `pag_layers` replaced by the identity (PAG)."""
        if perturb not in (None, "pag"):
            raise NotImplementedError(f"TextConditionalUNet implements the 'pag' perturbation only, not {perturb!r}")
        with perturbed_self_attention(self.unet, self.pag_layers) if perturb else nullcontext():
            return self._forward(x, t, cond)

    def _forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        dtype = self.unet.dtype
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        added = None
        if self.sdxl:
            time_ids = cond.get("time_ids")
            added = {"text_embeds": cond["text_embeds"].to(dtype),
                     "time_ids": (self._time_ids(x) if time_ids is None else time_ids).to(dtype)}
        return self.unet(x.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                         added_cond_kwargs=added).sample

    def describe(self) -> dict[str, Any]:
        return {"kind": "text", "diffusers_class": "UNet2DConditionModel", "pretrained": self.pretrained,
                "condition_keys": self.conditioner.text_keys + (["time_ids"] if self.sdxl else []),
                "vae_scale_factor": self.vae_scale_factor, "config": dict(self.unet.config)}
