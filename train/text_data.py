"""Text batches as latent diffusion methods train on them: image-caption pairs as (latents [B, C, h, w], text
condition dict), latents encoded once by the model's VAE and cached, captions encoded by its text encoder(s)
and cached per prompt; and prompt sets as (None, text condition dict) for data-free methods."""
from __future__ import annotations

import hashlib
import os

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from data.captions import CaptionedImageDataModule
from data.resumable import ResumableLoader, training_loader


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
        path = getattr(_trained_network(self.trainer), "pretrained", None)
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
        return training_loader(data, self.batch_size, self.num_workers, self.trainer)

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


def _trained_network(trainer):
    """The text adapter of the method module a trainer runs (unwrapping a w-conditioned student's `.base`), or None."""
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    if module is None or not hasattr(module, "sampling_denoiser"):
        return None
    try:
        net = module.sampling_denoiser().net
    except (NotImplementedError, AttributeError):
        return None
    return getattr(net, "base", net)


class EncodedPromptDataModule(L.LightningDataModule):
    """Batches of (None, text condition dict) for data-free methods on text models (one-step distillation,
    erasure): data.prompts.PromptDataModule's prompts, encoded per prompt (cached) after the batch reaches its
    device. The first element stands where image methods get real images: there are none.

    path, column, batch_size, val_size, seed, split: the prompt set (data.prompts.PromptDataModule).
    pretrained: the pipeline folder whose text encoder(s) encode the prompts; None: the trained network's own
                (its `pretrained`, with the same T5 settings), so a config names the model path once.
    embedded_guidance: for guidance-distilled networks (FLUX.1-dev): the guidance INPUT given with every prompt
                (cond["guidance"]); None for every other model.
    """

    has_images = False  # prompts only: no real samples for a discriminator

    def __init__(self, path: str, pretrained: str | None = None, batch_size: int = 4, column: str | None = None,
                 val_size: int = 4, seed: int = 0, split: str = "train", num_workers: int = 0,
                 embedded_guidance: float | None = None):
        super().__init__()
        from data.prompts import PromptDataModule

        self.prompts = PromptDataModule(path, column, batch_size, val_size, seed, split, num_workers)
        self.pretrained, self.embedded_guidance = pretrained, embedded_guidance
        self.encoder = None

    @property
    def val_prompts(self) -> list[str]:
        return self.prompts.val_prompts

    def setup(self, stage: str | None = None) -> None:
        self.prompts.setup()
        if self.encoder is not None:
            return
        from models.text_encoders import PromptEncoder, prompt_encoder_for

        net = _trained_network(self.trainer)
        if self.pretrained is None and getattr(net, "pretrained", None) is not None:
            self.encoder = prompt_encoder_for(net)
        elif self.pretrained is not None:
            self.encoder = PromptEncoder.from_pretrained(self.pretrained)
        else:
            raise ValueError("EncodedPromptDataModule needs the model folder: set data `pretrained:` or train a "
                             "network loaded from one (a text adapter with `pretrained:`)")

    def train_dataloader(self) -> ResumableLoader:
        self.prompts.trainer = self.trainer
        return self.prompts.train_dataloader()

    def val_dataloader(self) -> DataLoader:
        return self.prompts.val_dataloader()

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.encoder is None:
            self.setup()
        device = self.trainer.lightning_module.device if self.trainer is not None else self.encoder.device
        if self.encoder.device != device:
            self.encoder.to(device)
        cond = self.encoder.encode(list(batch))
        if self.embedded_guidance is not None:
            cond["guidance"] = torch.full((len(batch),), float(self.embedded_guidance), device=device)
        return None, cond
