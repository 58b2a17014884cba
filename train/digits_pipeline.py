"""The text-conditioned demo's data and model folder: scikit-learn's digits with captions ("a handwritten seven",
"the digit seven", "the number 7") and a Stable-Diffusion-1.x-layout pipeline folder built for them locally (the
metrics of models trained on them: train.evaluation.digits_text).

The folder holds what a real SD 1.x snapshot holds, at digits scale: a CLIP tokenizer and a randomly initialised
(frozen) CLIP text encoder, a latent autoencoder trained here on the training digits (8x8 RGB <-> 1 x 8 x 8
latents), an untrained UNet2DConditionModel with cross-attention, and a DDIM scheduler config (cosine betas,
v-prediction). The teacher is then trained on the captioned digits by `fit` (configs/text_digits/teacher.yaml);
StableDiffusionPipeline.from_pretrained loads the folder and every export.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from train.evaluation.digits_text import TEMPLATES, caption

MAX_TOKENS = 24  # byte-level tokens: "a handwritten seven" is 19 with BOS and EOS


def write_captioned_digits(folder: str | Path, templates: Sequence[str] = TEMPLATES) -> Path:
    """The 1497 training digits as 8x8 grayscale PNGs with captions (metadata.jsonl: each image once per template),
    the layout data.captions reads, and prompts.txt: the 30 distinct captions (the prompt set of data-free methods). The 300 held-out digits are not written: the metrics compare with them."""
    from PIL import Image

    from data.digits import _digits_arrays

    folder = Path(folder)
    images, labels, is_val = _digits_arrays()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".captions-", dir=folder.parent))
    rows = []
    for i in np.flatnonzero(~is_val):
        name = f"{i:04d}.png"
        pixels = np.rint((images[i, 0] + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(tmp / name)
        rows += [{"file_name": name, "text": caption(t, labels[i]), "label": int(labels[i])} for t in templates]
    (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = [caption(t, c) for c in range(10) for t in templates]  # the prompt set of the data-free methods
    (tmp / "prompts.txt").write_text("".join(p + "\n" for p in prompts))
    _replace_dir(tmp, folder)
    return folder


def train_digits_vae(steps: int = 600, batch_size: int = 128, lr: float = 1e-3, kl_weight: float = 1e-3,
                     seed: int = 0, progress: bool = True):
    """A diffusers AutoencoderKL for 8x8 RGB digits with 1 x 8 x 8 latents (one level, no downsampling), trained on the
    training digits: MSE reconstruction + kl_weight x KL(q(z|x) || N(0, I)) per pixel (Kingma & Welling 2014;
    the KL-regularised autoencoder of latent diffusion, Rombach et al. 2022, arXiv 2112.10752, sec. 3).
    Its scaling_factor is set to 1 / std of the training latents (Rombach et al., sec. 4.3.2)."""
    from diffusers import AutoencoderKL
    from tqdm import tqdm

    from data.digits import _digits_arrays

    images, _, is_val = _digits_arrays()
    x = torch.from_numpy(np.array(images[~is_val])).repeat(1, 3, 1, 1)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(32,), latent_channels=1,
                        norm_num_groups=8, layers_per_block=1, sample_size=8)
    opt = torch.optim.Adam(vae.parameters(), lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="digits VAE", disable=not progress):
        batch = x[torch.randint(len(x), (batch_size,), generator=gen)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(gen)).sample
        loss = torch.nn.functional.mse_loss(recon, batch) + kl_weight * posterior.kl().mean() / batch[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        std = float(vae.encode(x).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


def build_digits_pipeline(folder: str | Path, vae_steps: int = 600, seed: int = 0, progress: bool = True) -> Path:
    """Write the text digits pipeline folder (StableDiffusionPipeline layout: model_index.json, unet/, vae/,
    text_encoder/, tokenizer/, scheduler/) atomically; the UNet is untrained (the teacher stage trains it)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from models.tiny_pipelines import tiny_clip_text_encoder, tiny_clip_tokenizer

    folder = Path(folder)
    tokenizer = tiny_clip_tokenizer(max_length=MAX_TOKENS)
    text_encoder = tiny_clip_text_encoder(tokenizer, hidden=32, layers=2, seed=seed + 1)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                              clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    vae = train_digits_vae(vae_steps, seed=seed, progress=progress)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pipeline-", dir=folder.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    _replace_dir(tmp, folder)
    return folder


def _replace_dir(tmp: Path, folder: Path) -> None:
    """Move the finished `tmp` to `folder`, replacing an older one only once the new one is complete."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
