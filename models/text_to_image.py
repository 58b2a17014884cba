"""A text-to-image model loaded from one local folder: network adapter, prompt encoder, VAE, schedule and
parameterisation, and guided generation with prompts and negative prompts through guidance.samplers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from guidance.denoiser import Denoiser
from guidance.guided import GuidedDenoiser
from guidance.guiders import Guider, build_guider
from guidance.samplers import sample
from guidance.schedules import Schedule
from models.adapters import ConditionalNetwork
from models.text_encoders import PromptEncoder
from models.vae import LatentVAE


@dataclass
class TextToImage:
    """The parts of a latent text-to-image model, each usable on its own.

    net:              the network adapter (net(x, t, cond), null_cond, drop_cond), e.g. TextConditionalUNet.
    encoder:          prompts -> text condition dicts (cached per prompt).
    vae:              latents <-> images (None: latents only).
    schedule, parameterization: the model's training schedule and output type (from its scheduler config).
    """

    net: ConditionalNetwork
    encoder: PromptEncoder
    vae: LatentVAE | None
    schedule: Schedule
    parameterization: str

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32", with_vae: bool = True, use_t5: bool = True,
                        max_sequence_length: int = 256) -> "TextToImage":
        """Load a Stable Diffusion 1.x/2.x, SDXL (unet/) or SD3 (transformer/) folder in diffusers layout (never
        downloads). use_t5, max_sequence_length: SD3's T5 encoder (off: zeros in its place) and token count."""
        from pathlib import Path

        from models.pretrained import schedule_from_pretrained, torch_dtype

        if (Path(path) / "transformer").is_dir():
            from models.text_transformer import SD3Transformer

            encoder = PromptEncoder.from_pretrained(path, kind="sd3", dtype=torch_dtype(dtype), use_t5=use_t5,
                                                    max_sequence_length=max_sequence_length)
            net: ConditionalNetwork = SD3Transformer(path, dtype=dtype, use_t5=use_t5,
                                                     max_sequence_length=max_sequence_length)
        else:
            from models.text_unet import TextConditionalUNet

            encoder = PromptEncoder.from_pretrained(path, dtype=torch_dtype(dtype))
            net = TextConditionalUNet(path, dtype=dtype)
        vae = LatentVAE.from_pretrained(path, dtype=torch_dtype(dtype)) if with_vae else None
        schedule, param = schedule_from_pretrained(path)
        return cls(net.eval(), encoder, vae, schedule, param)

    def denoiser(self) -> Denoiser:
        return Denoiser(self.net, self.schedule, self.parameterization)

    def conditions(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                   negatives: Sequence[str | Sequence[str]] | None = None) -> tuple[dict, object]:
        """(cond, neg_cond) for a batch of prompts.

        negative_prompt: one negative per batch (a string, or one per prompt): the "uncond" branch of CFG-like
                         guiders uses it instead of the null condition (diffusers' negative_prompt).
        negatives:       several negative prompts for Perp-Neg (branches "neg:0", "neg:1", ...); each entry a
                         string or one string per prompt. Exclusive with negative_prompt.
        """
        if negative_prompt is not None and negatives is not None:
            raise ValueError("give either negative_prompt (CFG's negative branch) or negatives (Perp-Neg's list), not both")
        b = len(prompts)
        cond = self.encoder.encode(list(prompts))

        def per_sample(p):
            p = [p] * b if isinstance(p, str) else list(p)
            if len(p) != b:
                raise ValueError(f"a negative prompt list must have one entry per prompt ({b}), got {len(p)}")
            return {**self.encoder.encode(p), **{k: v for k, v in cond.items() if k == "time_ids"}}

        if negative_prompt is not None:
            return cond, per_sample(negative_prompt)
        if negatives is not None:
            return cond, [per_sample(n) for n in negatives]
        return cond, None

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], w: float | Tensor = 7.5, steps: int = 50, guider: Guider | str = "cfg",
                 sampler: str = "ddim", negative_prompt=None, negatives=None, noise: Tensor | None = None,
                 size: tuple[int, int] | None = None, generator: torch.Generator | None = None, eta: float = 0.0,
                 decode: bool = True) -> Tensor:
        """Images [B, 3, H, W] in about [-1, 1] (decode=True) or latents [B, C, h, w].

        w: guidance scale in this project's convention D_u + w (D_c - D_u), which is diffusers'
        guidance_scale. noise: initial latents [B, C, h, w] (unit Gaussian); else drawn from `generator`
        at `size` (pixels; default the UNet's sample_size times the VAE factor).
        """
        if isinstance(guider, str):
            guider = build_guider(guider)
        cond, neg = self.conditions(prompts, negative_prompt, negatives)
        if noise is None:
            unet_cfg = self.net.unet.config
            f = self.vae.scale_factor if self.vae is not None else 8
            h, w_px = size or (unet_cfg.sample_size * f, unet_cfg.sample_size * f)
            noise = torch.randn(len(prompts), unet_cfg.in_channels, h // f, w_px // f, generator=generator)
        noise = noise.to(self.encoder.device)
        guided = GuidedDenoiser(self.denoiser(), guider)
        latents = sample(guided, noise, cond, w, steps=steps, sampler=sampler, eta=eta, neg_cond=neg, generator=generator)
        return self.vae.decode(latents) if decode and self.vae is not None else latents
