"""The fit progress bar in optimizer steps: `step 120/400` with the time left, across epochs (the methods count steps,
not epochs; Lightning's own bar restarts every epoch and shows `Epoch 1/-2` when only max_steps is set)."""
from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n


class StepProgressBar(TQDMProgressBar):
    """TQDMProgressBar whose training bar counts `trainer.global_step` up to `trainer.max_steps` (or the epoch's
    batches when no max_steps is set) and stays one bar for the whole fit."""

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        if trainer.max_steps is None or trainer.max_steps < 0:
            return super().on_train_epoch_start(trainer, *_)
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:
            bar.reset(total=trainer.max_steps)
            bar.initial = 0
        _update_n(bar, trainer.global_step)
        bar.set_description(f"step (epoch {trainer.current_epoch})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.max_steps is None or trainer.max_steps < 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            _update_n(bar, trainer.global_step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.max_steps is None or trainer.max_steps < 0:
            return super().on_train_epoch_end(trainer, pl_module)
        if self.train_progress_bar is not None:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
