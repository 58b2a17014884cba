"""Text-conditioned flow-matching transformers behind net(x, t, cond): diffusers' SD3Transformer2DModel
(Stable Diffusion 3 / 3.5, MMDiT) with the empty-prompt embedding as the null condition. Both export themselves
through models.pipeline_export.PipelineExport (a StableDiffusion3Pipeline / FluxPipeline folder, a diffusers LoRA file)."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Sequence

import torch
from torch import Tensor

from models.adapters import ConditionalNetwork
from models.conditioning import TextConditioner
from models.pag_attention import perturbed_self_attention
from models.pipeline_export import PipelineExport

SD3_KEYS = ("encoder_hidden_states", "pooled_projections")
# PAG's perturbed joint attention: transformer block 1 (diffusers' StableDiffusion3PAGPipeline default "blocks.1");
# Flux has no PAG pipeline to follow: the same pattern, which there selects double block 1 and single block 1
PAG_LAYERS = ("blocks.1",)


class SD3Transformer(PipelineExport, ConditionalNetwork):
    """`SD3Transformer2DModel` on latents with an SD3 text condition (models.text_encoders, kind "sd3"):

        cond = {"encoder_hidden_states": [B, 77 + L_t5, D_joint], "pooled_projections": [B, P]}

    x: [B, C, h, w] latents; t: [B] network time = 1000 sigma (the schedule is guidance.schedules.RectifiedFlow
    with the model's shift, time_scale 1000, as the pipeline passes its timesteps). Returns the velocity
    u = eps - x0 (parameterization "flow"; Esser et al. 2024, arXiv 2403.03206, Eq. 2-3 with alpha = 1 - t).

    pretrained:          a local pipeline folder in diffusers layout (transformer/, text_encoder*/, tokenizer*/,
                         vae/, scheduler/); its text encoders make the conditions (`conditioner`; the null
                         condition is "" through the same encoders, SD3 has no zeroed negative). Nothing is
                         downloaded.
    use_t5, max_sequence_length: how prompts are encoded (with or without T5, and T5's token count).
    dtype:               the transformer's weights ("float32", "float16", "bfloat16").
    text_encoder_dtype:  the frozen text encoders' dtype ("bfloat16" halves T5's memory; None: as stored).
    pag_layers:          the joint-attention layers `forward(..., perturb="pag")` perturbs (perturbed-attention
                         guidance: the image tokens' attention to each other becomes the identity, their attention to
                         the text is kept, as diffusers' PAGJointAttnProcessor2_0 does); patterns of module names
                         (models.pag_attention.pag_layer_modules), default block 1.
    """

    feature_layer = "transformer.norm_out:input"  # the image tokens after the last block (models.discriminator)

    def __init__(self, pretrained: str, subfolder: str = "transformer", dtype: str = "float32", use_t5: bool = True,
                 max_sequence_length: int = 256, pag_layers: Sequence[str] = PAG_LAYERS,
                 text_encoder_dtype: str | None = None):
        super().__init__()
        from diffusers import SD3Transformer2DModel

        from models.pretrained import check_pipeline_folder, torch_dtype

        root = check_pipeline_folder(pretrained, subfolder)
        net = SD3Transformer2DModel.from_pretrained(root, subfolder=subfolder, local_files_only=True,
                                                    torch_dtype=torch_dtype(dtype)).train()
        settings = dict(kind="sd3", max_sequence_length=max_sequence_length, use_t5=use_t5)
        if text_encoder_dtype:
            settings["dtype"] = torch_dtype(text_encoder_dtype)
        self._setup(net, None, str(pretrained), settings, pag_layers)

    @classmethod
    def from_transformer(cls, transformer, null_cond: dict[str, Tensor]) -> "SD3Transformer":
        """Wrap an existing SD3Transformer2DModel; null_cond: `PromptEncoder.null(1)` of an "sd3" encoder."""
        obj = cls.__new__(cls)
        ConditionalNetwork.__init__(obj)
        obj._setup(transformer, null_cond, None, dict(kind="sd3"), PAG_LAYERS)
        return obj

    def _setup(self, transformer, null_cond: dict[str, Tensor] | None, pretrained: str | None, settings: dict,
               pag_layers: Sequence[str]) -> None:
        self.transformer = transformer
        self.pretrained, self.pag_layers = pretrained, list(pag_layers)
        self.conditioner = TextConditioner(SD3_KEYS, pretrained, settings, null_cond,
                                           width=transformer.config.joint_attention_dim)

    @property
    def unet(self):
        """The diffusers network (named like the UNet adapters' so w-embedding hooks and checkpointing find it)."""
        return self.transformer

    @property
    def vae_folder(self) -> str | None:
        return self.pretrained

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], perturb: str | None = None) -> Tensor:
        """perturb="pag": the pass with the joint attention of `pag_layers` perturbed (PAG)."""
        if perturb not in (None, "pag"):
            raise NotImplementedError(f"SD3Transformer implements the 'pag' perturbation only, not {perturb!r}")
        dtype = self.transformer.dtype
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        with perturbed_self_attention(self.transformer, self.pag_layers) if perturb else nullcontext():
            return self.transformer(hidden_states=x.to(dtype), timestep=t,
                                    encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                                    pooled_projections=cond["pooled_projections"].to(dtype)).sample

    def describe(self) -> dict[str, Any]:
        return {"kind": "text", "diffusers_class": "SD3Transformer2DModel", "pretrained": self.pretrained,
                "condition_keys": self.conditioner.text_keys, "config": dict(self.transformer.config)}


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


class FluxTransformer(PipelineExport, ConditionalNetwork):
    """`FluxTransformer2DModel` (FLUX.1) on latents [B, C, h, w] with a Flux text condition (models.text_encoders,
    kind "flux"):

        cond = {"encoder_hidden_states": [B, L_t5, D], "pooled_projections": [B, P], "guidance": [B] (FLUX.1-dev)}

    The latents are packed into 2x2-patch tokens with their (0, row, col) position ids inside forward and the
    output unpacked, so samplers and guiders see ordinary [B, C, h, w] tensors. t: [B] = 1000 sigma (the
    transformer receives sigma, as the pipeline divides by 1000). Output: the velocity eps - x0 ("flow").

    FLUX.1-dev is guidance-distilled: its guidance scale is an INPUT, embedded like the timestep, not a rule
    combining branches. It is carried as cond["guidance"] (per sample, left alone by null_cond and drop_cond;
    the conditioner adds `embedded_guidance` to every encoded prompt), so one evaluation per step with the
    "conditional" guider reproduces the pipeline's guidance_scale, and a CFG guider on top (w, with a negative
    prompt) is the pipeline's true_cfg_scale. FLUX.1-schnell has no guidance embedding and ignores the entry.

    pretrained: local pipeline folder (transformer/, text_encoder/ (CLIP), text_encoder_2/ (T5), vae/, scheduler/).
    max_sequence_length: T5 tokens of the prompt encoding (512 for dev).
    embedded_guidance: the guidance input of a guidance-distilled transformer given with every prompt (3.5, the
                FluxPipeline default); unused by a transformer without guidance embedding.
    text_encoder_dtype: the frozen text encoders' dtype ("bfloat16" halves T5's memory; None: as stored).
    sample_size: latent pixels per side generated by default (Flux's config has none); None: the VAE's
                 sample_size / its scale factor (128 for FLUX.1, i.e. 1024 px, the pipeline's default).
    pag_layers: the attention layers `forward(..., perturb="pag")` perturbs (double and single blocks; the image
                tokens' attention to each other becomes the identity, as for SD3), default "blocks.1".
    """

    feature_layer = "transformer.norm_out:input"  # the image tokens after the last block (models.discriminator)

    def __init__(self, pretrained: str, subfolder: str = "transformer", dtype: str = "float32",
                 max_sequence_length: int = 512, sample_size: int | None = None, pag_layers: Sequence[str] = PAG_LAYERS,
                 embedded_guidance: float = 3.5, text_encoder_dtype: str | None = None):
        super().__init__()
        from diffusers import FluxTransformer2DModel

        from models.pretrained import check_pipeline_folder, torch_dtype

        root = check_pipeline_folder(pretrained, subfolder)
        net = FluxTransformer2DModel.from_pretrained(root, subfolder=subfolder, local_files_only=True,
                                                     torch_dtype=torch_dtype(dtype)).train()
        settings = dict(kind="flux", max_sequence_length=max_sequence_length)
        if text_encoder_dtype:
            settings["dtype"] = torch_dtype(text_encoder_dtype)
        self._setup(net, None, str(pretrained), settings, embedded_guidance, pag_layers)
        self.sample_size = int(sample_size or default_latent_size(root))

    @classmethod
    def from_transformer(cls, transformer, null_cond: dict[str, Tensor],
                         embedded_guidance: float = 3.5) -> "FluxTransformer":
        obj = cls.__new__(cls)
        ConditionalNetwork.__init__(obj)
        obj._setup(transformer, null_cond, None, dict(kind="flux"), embedded_guidance, PAG_LAYERS)
        obj.sample_size = 128
        return obj

    def _setup(self, transformer, null_cond: dict[str, Tensor] | None, pretrained: str | None, settings: dict,
               embedded_guidance: float, pag_layers: Sequence[str]) -> None:
        self.transformer = transformer
        self.pretrained, self.pag_layers = pretrained, list(pag_layers)
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        self.conditioner = TextConditioner(FLUX_KEYS, pretrained, settings, null_cond,
                                           embedded_guidance if self.guidance_embeds else None)

    @property
    def unet(self):
        return self.transformer

    @property
    def vae_folder(self) -> str | None:
        return self.pretrained

    def sample_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the (unpacked) latents generated by default: in_channels / 4 channels (a token is a 2x2
        patch), `sample_size` pixels per side."""
        return (self.transformer.config.in_channels // 4, self.sample_size, self.sample_size)

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], perturb: str | None = None) -> Tensor:
        """perturb="pag": the pass with the attention of `pag_layers` perturbed (PAG)."""
        if perturb not in (None, "pag"):
            raise NotImplementedError(f"FluxTransformer implements the 'pag' perturbation only, not {perturb!r}")
        text_tokens = cond["encoder_hidden_states"].shape[1]
        with perturbed_self_attention(self.transformer, self.pag_layers, text_tokens) if perturb else nullcontext():
            return self._forward(x, t, cond)

    def _forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        dtype, (b, _, h, w) = self.transformer.dtype, x.shape
        t = t.expand(b) if t.ndim == 0 else t
        guidance = None
        if self.guidance_embeds:
            if cond.get("guidance") is None:
                raise ValueError("this Flux transformer is guidance-distilled (FLUX.1-dev): give its guidance scale as "
                                 "cond['guidance'] ([B] floats, e.g. 3.5; the conditioner adds its embedded_guidance)")
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
                "condition_keys": self.conditioner.text_keys + (["guidance"] if self.guidance_embeds else []),
                "embedded_guidance": self.conditioner.embedded_guidance, "config": dict(self.transformer.config)}


def default_latent_size(root) -> int:
    """The VAE config's sample_size (pixels) over its scale factor: the pipeline's default latent size."""
    import json

    from models.pretrained import vae_scale_factor_of

    p = root / "vae" / "config.json"
    size = json.loads(p.read_text()).get("sample_size", 1024) if p.is_file() else 1024
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size) // vae_scale_factor_of(root)
