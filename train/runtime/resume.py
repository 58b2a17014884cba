"""Exact resume: the random state of each training batch is a function of (seed, batch index) only."""
from __future__ import annotations

import os
import random

import lightning as L
import numpy as np
import torch


def batch_seed(seed: int, batch: int) -> int:
    """A 64-bit seed for one training batch, well mixed from the run seed and the batch index."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1, np.uint64)[0])


class StepSeed(L.Callback):
    """Seeds torch (CPU and every GPU), numpy and `random` before each training batch with
    batch_seed(seed, index of the batch since the start of training), the same on every process: each
    process takes its own samples' values from draws made for the whole global batch
    (MethodModule.per_sample), so N processes compute what one process computes on the global batch.

    What a training step draws (timesteps, noise, scales w, label dropout, dropout masks) then depends only on
    where in training it is, not on what ran before it in this process (validation, a sanity check, or the
    steps of an interrupted run that a resumed one never executed). Together with a data order that resumes
    mid-epoch (data.resumable.ResumableLoader) and the checkpointed weights, optimizer and scheduler state, a
    run resumed from a checkpoint computes the same losses, step for step, as an uninterrupted one. The batch
    index (the fit loop's total batch count, restored from checkpoints) is used rather than global_step,
    which repeats under gradient accumulation and after skipped updates.

    MethodModule.configure_callbacks adds one to every fit, so every method gets it.

    seed: the run seed; default the `seed_everything` seed (PL_GLOBAL_SEED), else torch.initial_seed(). It is
          saved in checkpoints: a resumed run keeps the seed of the run it continues.
    """

    def __init__(self, seed: int | None = None):
        super().__init__()
        self.seed = seed

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed() % 2**63))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        index = trainer.fit_loop.epoch_loop.total_batch_idx
        s = batch_seed(self.seed, index)
        torch.manual_seed(s)  # also seeds every CUDA device
        np.random.seed(s % 2**32)
        random.seed(s)

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seed = state_dict["seed"]
