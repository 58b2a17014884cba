"""Data for methods that need no real images: batches of step indices that only pace training (checkpoints and
validation count steps, not epochs)."""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from data.resumable import ResumableLoader


class ErasureSteps(L.LightningDataModule):
    """The data of an erasure run when it needs no real images: batches of step indices ([1] long) that only
    pace training; x_t comes from the frozen model's trajectories (see ConceptErasure). Give a labelled
    datamodule (data.digits.DigitsDataModule) instead to take x_t from real images.

    steps_per_epoch: batches per training epoch (checkpoints and validation count steps, not epochs).
    """

    def __init__(self, steps_per_epoch: int = 1000):
        super().__init__()
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        self.steps_per_epoch = steps_per_epoch

    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(torch.arange(self.steps_per_epoch), batch_size=1, shuffle=False)  # resumes mid-epoch

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.arange(1), batch_size=1)
