"""The latent autoencoder of latent diffusion models: diffusers `AutoencoderKL` with the family's scaling
(and shift) factor, encode/decode, and a latent cache so a fixed image set is encoded once."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


class LatentVAE(nn.Module):
    """Images [B, 3, H, W] in [-1, 1] <-> diffusion latents [B, C, H/f, W/f] (f = `scale_factor`).

    Latents are (z - shift_factor) * scaling_factor (Rombach et al. 2022, arXiv 2112.10752, sec. 4.3.2:
    latents rescaled to unit variance; SD3 and Flux also subtract a shift), with the factors from the
    VAE's own config, as the diffusers pipelines read them. The VAE is frozen.

    vae:    a diffusers AutoencoderKL.
    sample: encode to a sample of the posterior (True) or its mean (False, deterministic; default).
    """

    def __init__(self, vae: nn.Module, sample: bool = False):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.sample = sample
        cfg = vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.scale_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)

    @classmethod
    def from_pretrained(cls, path: str, subfolder: str = "vae", dtype: torch.dtype | None = None,
                        sample: bool = False) -> "LatentVAE":
        """Load `subfolder` of a local pipeline folder in diffusers layout (never downloads)."""
        from diffusers import AutoencoderKL

        from models.pretrained import check_pipeline_folder

        root = check_pipeline_folder(path, subfolder)
        kw = {"torch_dtype": dtype} if dtype is not None else {}
        return cls(AutoencoderKL.from_pretrained(root, subfolder=subfolder, local_files_only=True, **kw), sample)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] -> latents [B, C, H/f, W/f] (float32)."""
        dist = self.vae.encode(images.to(self.dtype)).latent_dist
        z = dist.sample(generator) if self.sample else dist.mean
        return (z.float() - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, C, h, w] -> images [B, 3, h f, w f] in about [-1, 1] (not clamped; float32)."""
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.dtype)).sample.float()


_SHARED: dict[str, LatentVAE] = {}


def shared_vae(folder: str) -> LatentVAE:
    """The process's LatentVAE of a pipeline folder's vae/ (loaded once; the methods, evaluation and data of a run
    share it)."""
    import os

    key = os.path.abspath(os.path.expanduser(folder))
    if key not in _SHARED:
        _SHARED[key] = LatentVAE.from_pretrained(key)
    return _SHARED[key]


@torch.no_grad()
def cached_latents(vae: LatentVAE, images: Tensor, cache: str | Path | None = None, batch_size: int = 16) -> Tensor:
    """Latents [N, C, h, w] of images [N, 3, H, W] in [-1, 1], encoded once (in batches) and kept.

    cache: a .safetensors file. When it exists and holds N latents of the right shape they are read back
    (no encoding); otherwise the images are encoded and written there. The file also records the scaling
    and shift factors, and a cache written with other factors is refused rather than silently reused.
    """
    from safetensors.torch import load_file, save_file

    n = images.shape[0]
    meta = torch.tensor([vae.scaling_factor, vae.shift_factor], dtype=torch.float64)
    if cache is not None and Path(cache).is_file():
        stored = load_file(str(cache))
        if not torch.equal(stored["factors"], meta):
            raise ValueError(f"latent cache {cache} was written with other VAE factors {stored['factors'].tolist()} "
                             f"(this VAE: {meta.tolist()}); delete it to re-encode")
        if stored["latents"].shape[0] == n:
            return stored["latents"]
    out = torch.cat([vae.encode(images[i:i + batch_size].to(next(vae.vae.parameters()).device)).cpu()
                     for i in range(0, n, batch_size)])
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(cache) + ".tmp")
        save_file({"latents": out.contiguous(), "factors": meta}, str(tmp))
        tmp.replace(cache)
    return out
