"""Fit progress in optimizer steps: the bar (`step 120/400` with the time left, across epochs: the methods count steps,
not epochs; Lightning's own bar restarts every epoch and shows `Epoch 1/-2` when only max_steps is set), and
ProgressLog, the same as plain lines for a log file."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L

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


class ProgressLog(L.Callback):
    """Every `every` of trainer.max_steps (and at the end), a line `<name>: step 120/400 (30%), 0:42 elapsed, about
    1:38 left` to the terminal and appended to `path` (e.g. the demo's log), on process 0 only.

    path: the log file; name: what the lines call the run; every: the fraction of max_steps between lines."""

    def __init__(self, path: str | None = None, name: str = "fit", every: float = 0.1):
        if not 0 < every <= 1:
            raise ValueError(f"ProgressLog every must be a fraction of max_steps in (0, 1], got {every}")
        self.path, self.name, self.every = Path(path) if path else None, name, every
        self.next, self.start, self.first = 0, 0.0, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start, self.first = time.monotonic(), trainer.global_step
        self.next = trainer.global_step + self._stride(trainer)

    def _stride(self, trainer) -> int:
        return max(1, int(self.every * trainer.max_steps)) if trainer.max_steps and trainer.max_steps > 0 else 100

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step < self.next and step != trainer.max_steps:
            return
        self.next = step + self._stride(trainer)
        if not trainer.is_global_zero:
            return
        elapsed, done = time.monotonic() - self.start, step - self.first
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        line = f"{self.name}: step {step}" + (f"/{total} ({100 * step // total}%)" if total else "")
        line += f", {clock(elapsed)} elapsed"
        if total and done > 0:
            line += f", about {clock(elapsed / done * (total - step))} left"
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(f"[{time.strftime('%H:%M:%S')}] {line}\n")


def clock(seconds: float) -> str:
    """h:mm:ss (or m:ss) of a duration in seconds."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"
