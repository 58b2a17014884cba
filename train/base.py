"""What every method module shares: checkpoint metadata, the sampling view, and validation samples."""
from __future__ import annotations

import json
import math
from typing import Any

import lightning as L
import torch
from torch import Tensor

from guidance.denoiser import Denoiser
from guidance.guided import GuidedDenoiser
from guidance.guiders import Guider, build_guider
from guidance.samplers import sample

CHECKPOINT_KEY = "guidedistill"
CHECKPOINT_FORMAT = 1


def plain_config(obj: Any) -> Any:
    """JSON-able copy of a config (dicts, lists, numbers, strings); anything else becomes None.

    Lightning stores hyper-parameters with the checkpoint; keeping them plain is what lets checkpoints
    load with `torch.load(weights_only=True)`."""
    if isinstance(obj, dict):
        return {str(k): plain_config(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_config(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return None


def is_rebuildable(hparams: dict) -> bool:
    """True when hyper-parameters are a full config (built by the CLI or `train.config.instantiate`)."""
    return "_class_path" in hparams and json.dumps(plain_config(hparams)) == json.dumps(hparams, default=lambda o: None)


class MethodModule(L.LightningModule):
    """Base class of the method modules.

    Subclasses call `self.save_hyperparameters()` first thing in `__init__` and implement
    `sampling_denoiser()` (the network a user samples from after training) and `training_step`.
    `val_scale` / `val_steps` / `val_samples` control the samples drawn at each validation for the
    sample grid and the validation metrics (`val/fd`, `val/accuracy`).
    """

    method_name = "method"
    val_scale: float = 2.0
    val_steps: int = 20
    val_samples: int = 200

    # --- sampling -----------------------------------------------------------------------------
    def sampling_denoiser(self) -> Denoiser:
        raise NotImplementedError

    def guided(self, guider: Guider | str = "cfg", **guider_params) -> GuidedDenoiser:
        """The trained model wrapped by a guider, ready for `guidance.samplers.sample`."""
        g = build_guider(guider, **guider_params) if isinstance(guider, str) else guider
        return GuidedDenoiser(self.sampling_denoiser(), g)

    @torch.no_grad()
    def generate(self, labels: Tensor, scale: float = 2.0, steps: int = 50, sampler: str = "ddim",
                 guider: Guider | str = "cfg", seed: int = 0, batch_size: int = 500, progress: bool = False,
                 **guider_params) -> tuple[Tensor, float]:
        """Samples [N, C, H, W] for class labels [N] and network evaluations per sample.

        Noise comes from a CPU generator seeded with `seed`, so samples are identical across devices."""
        guided = self.guided(guider, **guider_params)
        shape = self.sample_shape()
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(labels), *shape, generator=gen)
        out = []
        for i in range(0, len(labels), batch_size):
            lab = labels[i:i + batch_size].to(self.device)
            out.append(sample(guided, noise[i:i + batch_size].to(self.device), lab, scale, steps, sampler,
                              generator=gen, progress=progress).cpu())
        nfe = guided.nfe / max(1, math.ceil(len(labels) / batch_size))
        return torch.cat(out), nfe

    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample; read from the network's config."""
        cfg = self.sampling_denoiser().net.unet.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    # --- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        hp = dict(self.hparams)
        rebuildable = is_rebuildable(hp)
        checkpoint["hyper_parameters"] = plain_config(hp) if rebuildable else {}
        checkpoint.pop("hparams_name", None)
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "method": self.method_name,
            "config": plain_config(hp) if rebuildable else None,
        }
