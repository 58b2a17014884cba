"""Text-conditioned flow-matching transformers behind net(x, t, cond): diffusers' SD3Transformer2DModel
(Stable Diffusion 3 / 3.5, MMDiT) with the empty-prompt embedding as the null condition."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from models.text_network import TextConditionalNetwork

SD3_KEYS = ("encoder_hidden_states", "pooled_projections")


class SD3Transformer(TextConditionalNetwork):
    """`SD3Transformer2DModel` on latents with an SD3 text condition (models.text_encoders, kind "sd3"):

        cond = {"encoder_hidden_states": [B, 77 + L_t5, D_joint], "pooled_projections": [B, P]}

    x: [B, C, h, w] latents; t: [B] network time = 1000 sigma (the schedule is guidance.schedules.RectifiedFlow
    with the model's shift, time_scale 1000, as the pipeline passes its timesteps). Returns the velocity
    u = eps - x0 (parameterization "flow"; Esser et al. 2024, arXiv 2403.03206, Eq. 2-3 with alpha = 1 - t).

    pretrained:          a local pipeline folder in diffusers layout (transformer/, text_encoder*/, tokenizer*/,
                         vae/, scheduler/); the null embedding ("" through the same encoders, SD3 has no
                         zeroed negative) is computed once from it. Nothing is downloaded.
    use_t5, max_sequence_length: must match the prompt encoder the conditions come from (the null prompt
                         is encoded with the same T5 setting and token count).
    dtype:               the transformer's weights ("float32", "float16", "bfloat16").
    """

    def __init__(self, pretrained: str, subfolder: str = "transformer", dtype: str = "float32", use_t5: bool = True,
                 max_sequence_length: int = 256):
        super().__init__()
        from diffusers import SD3Transformer2DModel

        from models.pretrained import check_pipeline_folder, torch_dtype
        from models.text_encoders import PromptEncoder

        root = check_pipeline_folder(pretrained, subfolder)
        net = SD3Transformer2DModel.from_pretrained(root, subfolder=subfolder, local_files_only=True,
                                                    torch_dtype=torch_dtype(dtype)).train()
        null = PromptEncoder.from_pretrained(str(root), kind="sd3", max_sequence_length=max_sequence_length,
                                             use_t5=use_t5).null(1)
        self._setup(net, null, str(pretrained))

    @classmethod
    def from_transformer(cls, transformer, null_cond: dict[str, Tensor]) -> "SD3Transformer":
        """Wrap an existing SD3Transformer2DModel; null_cond: `PromptEncoder.null(1)` of an "sd3" encoder."""
        obj = cls.__new__(cls)
        TextConditionalNetwork.__init__(obj)
        obj._setup(transformer, null_cond, None)
        return obj

    def _setup(self, transformer, null_cond: dict[str, Tensor], pretrained: str | None) -> None:
        self.transformer = transformer
        self.pretrained = pretrained
        self._set_null(null_cond, SD3_KEYS, transformer.dtype)
        d = null_cond["encoder_hidden_states"].shape[-1]
        if d != transformer.config.joint_attention_dim:
            raise ValueError(f"text embeddings have D={d} but the transformer's joint_attention_dim is "
                             f"{transformer.config.joint_attention_dim}; the text encoders and transformer differ")

    @property
    def unet(self):
        """The diffusers network (named like the UNet adapters' so w-embedding hooks and checkpointing find it)."""
        return self.transformer

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], perturb: str | None = None) -> Tensor:
        if perturb is not None:
            raise NotImplementedError(f"SD3Transformer does not implement the {perturb!r} perturbation")
        dtype = self.transformer.dtype
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.transformer(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                                pooled_projections=cond["pooled_projections"].to(dtype)).sample

    def describe(self) -> dict[str, Any]:
        return {"kind": "text", "diffusers_class": "SD3Transformer2DModel", "pretrained": self.pretrained,
                "condition_keys": list(self._null_keys), "config": dict(self.transformer.config)}


FLUX_KEYS = ("encoder_hidden_states", "pooled_projections")


def pack_latents(x: Tensor) -> Tensor:
    """Flux's token layout: [B, C, h, w] -> [B, (h/2)(w/2), 4C], each token a 2x2 latent patch (channel-major
    within the patch), rows of patches in raster order, as diffusers' FluxPipeline packs them."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of pack_latents: [B, (h/2)(w/2), 4C] -> [B, C, h, w]."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


class FluxTransformer(TextConditionalNetwork):
    """`FluxTransformer2DModel` (FLUX.1) on latents [B, C, h, w] with a Flux text condition (models.text_encoders,
    kind "flux"):

        cond = {"encoder_hidden_states": [B, L_t5, D], "pooled_projections": [B, P], "guidance": [B] (FLUX.1-dev)}

    The latents are packed into 2x2-patch tokens with their (0, row, col) position ids inside forward and the
    output unpacked, so samplers and guiders see ordinary [B, C, h, w] tensors. t: [B] = 1000 sigma (the
    transformer receives sigma, as the pipeline divides by 1000). Output: the velocity eps - x0 ("flow").

    FLUX.1-dev is guidance-distilled: its guidance scale is an INPUT, embedded like the timestep, not a rule
    combining branches. It is carried as cond["guidance"] (per sample, left alone by null_cond and drop_cond),
    so one evaluation per step with the "conditional" guider reproduces the pipeline's guidance_scale, and a
    CFG guider on top (w, with a negative prompt) is the pipeline's true_cfg_scale. FLUX.1-schnell has no
    guidance embedding and ignores the entry.

    pretrained: local pipeline folder (transformer/, text_encoder/ (CLIP), text_encoder_2/ (T5), vae/, scheduler/).
    max_sequence_length: T5 tokens, matching the prompt encoder the conditions come from (512 for dev).
    """

    def __init__(self, pretrained: str, subfolder: str = "transformer", dtype: str = "float32",
                 max_sequence_length: int = 512):
        super().__init__()
        from diffusers import FluxTransformer2DModel

        from models.pretrained import check_pipeline_folder, torch_dtype
        from models.text_encoders import PromptEncoder

        root = check_pipeline_folder(pretrained, subfolder)
        net = FluxTransformer2DModel.from_pretrained(root, subfolder=subfolder, local_files_only=True,
                                                     torch_dtype=torch_dtype(dtype)).train()
        null = PromptEncoder.from_pretrained(str(root), kind="flux", max_sequence_length=max_sequence_length).null(1)
        self._setup(net, null, str(pretrained))

    @classmethod
    def from_transformer(cls, transformer, null_cond: dict[str, Tensor]) -> "FluxTransformer":
        obj = cls.__new__(cls)
        TextConditionalNetwork.__init__(obj)
        obj._setup(transformer, null_cond, None)
        return obj

    def _setup(self, transformer, null_cond: dict[str, Tensor], pretrained: str | None) -> None:
        self.transformer = transformer
        self.pretrained = pretrained
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        self._set_null(null_cond, FLUX_KEYS, transformer.dtype)

    @property
    def unet(self):
        return self.transformer

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], perturb: str | None = None) -> Tensor:
        if perturb is not None:
            raise NotImplementedError(f"FluxTransformer does not implement the {perturb!r} perturbation")
        dtype, (b, _, h, w) = self.transformer.dtype, x.shape
        t = t.expand(b) if t.ndim == 0 else t
        guidance = None
        if self.guidance_embeds:
            if cond.get("guidance") is None:
                raise ValueError("this Flux transformer is guidance-distilled (FLUX.1-dev): give its guidance scale as "
                                 "cond['guidance'] ([B] floats, e.g. 3.5), or TextToImage.generate(embedded_guidance=...)")
            guidance = torch.as_tensor(cond["guidance"], device=x.device, dtype=torch.float32).expand(b)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=dtype)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device, dtype=dtype)[:, None]  # (0, row, col) per token
        img_ids[..., 2] += torch.arange(w // 2, device=x.device, dtype=dtype)[None, :]
        text = cond["encoder_hidden_states"].to(dtype)
        txt_ids = torch.zeros(text.shape[1], 3, device=x.device, dtype=dtype)
        out = self.transformer(hidden_states=pack_latents(x.to(dtype)), timestep=t / 1000, guidance=guidance,
                               pooled_projections=cond["pooled_projections"].to(dtype), encoder_hidden_states=text,
                               txt_ids=txt_ids, img_ids=img_ids.reshape(-1, 3)).sample
        return unpack_latents(out, h, w)

    def describe(self) -> dict[str, Any]:
        return {"kind": "text", "diffusers_class": "FluxTransformer2DModel", "pretrained": self.pretrained,
                "condition_keys": list(self._null_keys) + (["guidance"] if self.guidance_embeds else []),
                "config": dict(self.transformer.config)}
