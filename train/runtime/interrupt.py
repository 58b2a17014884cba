"""SIGTERM / SIGINT during fit: finish the step under way, write last.ckpt, exit with 128 + the signal number."""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException


class Interrupted(SIGTERMException):
    """Training stopped by a signal at the end of a step; `code` is 128 + the signal number (the shell's
    convention), so `python -m train fit` exits with 143 for SIGTERM and 130 for SIGINT."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class InterruptCheckpoint(L.Callback):
    """On SIGTERM (a scheduler pre-empting the job, `kill`) or SIGINT (Ctrl+C) during fit: let the training step
    under way finish, write `last.ckpt` into the checkpoint folder (ModelCheckpoint's dirpath, else
    <default_root_dir>/checkpoints), print one line saying how to resume, and stop. A second Ctrl+C quits at
    once without a checkpoint. `python -m train fit` adds one to every run.

    SIGTERM goes through Lightning's own handling (a flag checked when a step ends, then SIGTERMException,
    broadcast to every rank). SIGINT would be a KeyboardInterrupt raised wherever the program happens to be, e.g.
    between an optimizer step and the EMA update, and a checkpoint written there would not resume exactly; so
    while fit runs, SIGINT only sets a flag, and the step ends normally before the stop. Either way the
    checkpoint holds the state after a whole step (weights, optimizer, loops, data position, RNG seed).
    """

    def __init__(self):
        super().__init__()
        self.signum: int | None = None
        self._previous_sigint = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signal.SIGINT, self._previous_sigint or signal.default_int_handler)  # a second Ctrl+C: quit now
        print("\nCtrl+C: stopping after this training step and writing last.ckpt (press again to quit at once)",
              file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking:
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # the full state; written to a temporary file, then moved
        if trainer.is_global_zero:
            name = signal.Signals(getattr(exception, "signum", signal.SIGTERM)).name
            print(f"{name}: stopped after step {trainer.global_step} and wrote {path}; resume with the same command "
                  f"and --ckpt_path {path}", file=sys.stderr, flush=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_sigint()

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> Path:
        cb = trainer.checkpoint_callback
        folder = Path(cb.dirpath) if cb is not None and cb.dirpath else Path(trainer.default_root_dir) / "checkpoints"
        return folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"


class FinalCheckpoint(L.Callback):
    """At the normal end of fit, `last.ckpt` at the final step: ModelCheckpoint writes it only when one of its
    triggers fires (every_n_train_steps, an epoch end), so a run of max_steps 600 checkpointing every 500 steps
    ended with a last.ckpt of step 500 and lost the last 100. Only for runs that asked for last.ckpt
    (a ModelCheckpoint with save_last); `python -m train fit` adds one to every run."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cb = trainer.checkpoint_callback
        if not isinstance(cb, ModelCheckpoint) or not cb.save_last:
            return
        if getattr(cb, "_last_global_step_saved", None) == trainer.global_step:
            return
        trainer.save_checkpoint(InterruptCheckpoint.checkpoint_path(trainer), weights_only=False)
        cb._last_global_step_saved = trainer.global_step
