"""Callbacks: validation samples (grid PNG, W&B image, FD and accuracy) at fixed seeds."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class SampleMetrics(L.Callback):
    """At the end of each validation: sample `num_per_class` images per class at fixed seeds with the
    module's validation scale and steps, save a grid PNG (and log it to W&B), and log `val/fd`,
    `val/accuracy`, `val/precision`, `val/recall`, `val/nfe` from the digits classifier.

    num_per_class: samples per class for the metrics (the grid shows the first 8 of each class).
    metrics:       set False for networks the digits classifier cannot judge (other data sets).
    """

    def __init__(self, num_per_class: int = 20, metrics: bool = True, seed: int = 0):
        super().__init__()
        self.num_per_class, self.metrics, self.seed = num_per_class, metrics, seed

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.metrics:  # train or load the cached digits classifier once, before the first validation
            from train.evaluation import load_digits_classifier

            load_digits_classifier()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or not hasattr(pl_module, "generate"):
            return
        num_classes = pl_module.sampling_denoiser().net.num_classes
        labels = torch.arange(num_classes).repeat_interleave(self.num_per_class)
        images, nfe = pl_module.generate(labels, scale=pl_module.val_scale, steps=pl_module.val_steps, seed=self.seed)
        if trainer.is_global_zero:
            self._save_grid(trainer, images.view(num_classes, self.num_per_class, *images.shape[1:])[:, :8].flatten(0, 1))
        if self.metrics:
            from train.evaluation import evaluate_samples

            m = evaluate_samples(images, labels, nfe_per_sample=nfe)
            for key in ("fd", "accuracy", "precision", "recall", "nfe_per_sample"):
                pl_module.log(f"val/{key.replace('_per_sample', '')}", float(m[key]), sync_dist=True)

    def _save_grid(self, trainer: L.Trainer, images: torch.Tensor) -> None:
        from train.images import grid_array, save_grid

        root = Path(trainer.log_dir or trainer.default_root_dir)
        save_grid(images, root / "samples" / f"step{trainer.global_step:07d}.png", nrow=8)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image("val/samples", [grid_array(images, nrow=8)], step=trainer.global_step)
