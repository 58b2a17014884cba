"""Image-caption batches as a latent diffusion model trains on them: (latents [B, C, h, w], text condition
dict), latents encoded once by the model's VAE and cached, captions encoded by its text encoder(s) and
cached per prompt."""
from __future__ import annotations

import hashlib
import os

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from data.captions import CaptionedImageDataModule
from data.resumable import ResumableLoader, replica_kwargs


class _LatentsWithCaptions(torch.utils.data.Dataset):
    def __init__(self, latents: torch.Tensor, captions: list[str]):
        self.latents, self.captions = latents, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        return self.latents[int(i)], self.captions[int(i)]


class EncodedCaptionDataModule(L.LightningDataModule):
    """Batches of (latents [B, C, S/f, S/f] float32, text condition dict) for text-to-image training.

    pretrained: the local pipeline folder (diffusers layout) whose vae/ and text encoder(s) encode the data;
                None takes the network's own (`net.pretrained` of a models.text_unet.TextConditionalUNet),
                so a config names the model path once.
    path, image_size, caption_column, image_column, val_size, seed: the captioned images
                (data.captions.CaptionedImageDataModule).
    batch_size: pairs per step (per process).
    cache_dir:  where the latents are written once (latents-<hash>.safetensors, keyed by the source, size
                and model folder); None keeps them in memory only.
    embedded_guidance: for guidance-distilled networks (FLUX.1-dev): the guidance INPUT given with every
                caption (cond["guidance"]); None for every other model.

    The text condition is built after the batch reaches its device (`on_after_batch_transfer`), from the
    prompt encoder's per-prompt cache; the network's drop_cond then does the classifier-free caption dropout.
    """

    def __init__(self, path: str, pretrained: str | None = None, image_size: int = 512, batch_size: int = 4,
                 caption_column: str | None = None, image_column: str = "image", val_size: int = 8, seed: int = 0,
                 cache_dir: str | None = None, num_workers: int = 0, embedded_guidance: float | None = None):
        super().__init__()
        self.embedded_guidance = embedded_guidance
        self.captions = CaptionedImageDataModule(path, image_size, batch_size, caption_column, image_column,
                                                 val_size, seed, num_workers)
        self.pretrained, self.cache_dir, self.batch_size, self.num_workers = pretrained, cache_dir, batch_size, num_workers
        self.encoder = None
        self.sets: dict[str, _LatentsWithCaptions] = {}

    def _model_path(self) -> str:
        if self.pretrained is not None:
            return self.pretrained
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        net = getattr(getattr(module, "denoiser", None), "net", None)
        path = getattr(net, "pretrained", None) or getattr(getattr(net, "base", None), "pretrained", None)
        if path is None:
            raise ValueError("EncodedCaptionDataModule needs the model folder: set data `pretrained:` or train a "
                             "network loaded from one (models.text_unet.TextConditionalUNet with `pretrained:`)")
        return path

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        from models.text_encoders import PromptEncoder
        from models.vae import LatentVAE, cached_latents

        root = self._model_path()
        self.captions.setup()
        vae = LatentVAE.from_pretrained(root)
        for split, data in self.captions.sets.items():
            images = torch.stack([data[i][0] for i in range(len(data))])
            texts = [str(data.rows[i][data.caption_column]) for i in range(len(data))]
            cache = None
            if self.cache_dir is not None:
                key = hashlib.sha256(repr((os.path.abspath(self.captions.path), self.captions.image_size,
                                           os.path.abspath(root), split, texts)).encode()).hexdigest()[:16]
                cache = os.path.join(self.cache_dir, f"latents-{key}.safetensors")
            self.sets[split] = _LatentsWithCaptions(cached_latents(vae, images, cache), texts)
        del vae
        self.encoder = PromptEncoder.from_pretrained(root)

    @property
    def val_prompts(self) -> list[str]:
        self.setup()
        return self.sets["validation"].captions

    def train_dataloader(self) -> ResumableLoader:
        self.setup()
        data = self.sets["train"]
        return ResumableLoader(data, self.batch_size, shuffle=True, num_workers=self.num_workers,
                               drop_last=len(data) >= self.batch_size, **replica_kwargs(self.trainer))

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.sets["validation"], batch_size=self.batch_size, num_workers=self.num_workers)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        latents, captions = batch
        if self.encoder.device != latents.device:
            self.encoder.to(latents.device)
        cond = self.encoder.encode(list(captions))
        if self.embedded_guidance is not None:
            cond["guidance"] = torch.full((latents.shape[0],), float(self.embedded_guidance), device=latents.device)
        return latents, cond
