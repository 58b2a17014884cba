"""Exact resume for every method: a run stopped at step k and resumed from its checkpoint logs the same
per-step losses, bit for bit, as an uninterrupted run (train.runtime.resume.StepSeed + data.resumable.ResumableLoader)."""
from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from data.digits import DigitsDataModule
from tests.conftest import TINY_TEACHER
from train.runtime.config import instantiate, read_yaml
from data.steps import ErasureSteps
from train.runtime.resume import StepSeed

torch.set_num_threads(1)


class TrainLosses(L.Callback):
    """Every logged `train/...` value after each training batch, keyed by the batch's index in the run."""

    def __init__(self):
        self.rows: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        self.rows[trainer.fit_loop.epoch_loop.total_batch_idx] = metrics


def fit(make_module, make_data, max_steps: int, root: Path, ckpt: Path | None = None) -> dict[int, dict[str, float]]:
    """Fit from scratch (or resume from `ckpt`) to max_steps with a checkpoint after every step and a validation
    every 2 steps; the train/ metrics of each batch."""
    L.seed_everything(0, verbose=False)
    losses = TrainLosses()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root), check_val_every_n_epoch=None,
                        val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=1,
                        callbacks=[losses, ModelCheckpoint(dirpath=root / "checkpoints", save_last=True,
                                                           every_n_train_steps=1, save_top_k=0)])
    trainer.fit(make_module(), make_data(), ckpt_path=ckpt)
    return losses.rows


def straight_and_resumed(make_module, make_data, steps: int, stop: int, tmp_path: Path):
    """(losses of an uninterrupted run, losses of a run stopped after `stop` steps + its resumption)."""
    straight = fit(make_module, make_data, steps, tmp_path / "straight")
    part = fit(make_module, make_data, stop, tmp_path / "part")
    resumed = fit(make_module, make_data, steps, tmp_path / "resumed", tmp_path / "part" / "checkpoints" / "last.ckpt")
    assert sorted(part) == list(range(stop)) and sorted(resumed) == list(range(stop, steps))
    return straight, {**part, **resumed}


# --- the methods, tiny ---------------------------------------------------------------------------------

def teacher(ckpts=None):
    return instantiate(read_yaml(TINY_TEACHER)["model"])


def guidance_distillation(ckpts):
    return instantiate({"class_path": "train.methods.guidance_distillation.GuidanceDistillation",
                        "init_args": {"teacher": str(ckpts["teacher"]), "w_min": 1.0, "w_max": 5.0, "lr": 1e-3,
                                      "warmup_steps": 1, "ema_decay": 0.5, "val_steps": 2}})


def progressive(ckpts):  # 4 -> 2 -> 1 steps, 3 steps per round: resumed at step 2, the next round starts at 3
    return instantiate({"class_path": "train.methods.progressive.ProgressiveDistillation",
                        "init_args": {"student": str(ckpts["stage1"]), "start_steps": 4, "end_steps": 1,
                                      "steps_per_round": 3, "lr": 1e-3, "warmup_steps": 1, "ema_decay": 0.5}})


def onestep(ckpts):  # generator, LoRA fake score (2 updates per step) and discriminator: three optimizers
    return instantiate({"class_path": "train.methods.onestep.OneStepDistillation",
                        "init_args": {"teacher": str(ckpts["teacher"]), "objective": {"divergence": "jensen_shannon"},
                                      "discriminator": {"gan_weight": 0.1, "hidden": 16},
                                      "fake_score": {"updates": 2, "rank": 4}, "ema_decay": 0.9}})


def erasure(ckpts):  # the frozen trajectory banks, rebuilt every 2 steps
    return instantiate({"class_path": "train.methods.erasure.ConceptErasure",
                        "init_args": {"model": str(ckpts["teacher"]), "concepts": [3], "lr": 0.05, "batch_size": 4,
                                      "x_t_source": "frozen_bank", "trajectory_steps": 3, "bank_size": 4,
                                      "bank_refresh": 2, "val_samples": 0}})


METHODS = {  # name: (module, data, steps, stop)
    "teacher": (teacher, lambda: DigitsDataModule(batch_size=512), 5, 3),  # 2 batches per epoch: stops mid-epoch
    "guidance_distillation": (guidance_distillation, lambda: DigitsDataModule(batch_size=16), 4, 2),
    "progressive": (progressive, lambda: DigitsDataModule(batch_size=16), 5, 2),
    "onestep": (onestep, lambda: DigitsDataModule(batch_size=8), 4, 2),
    "erasure": (erasure, lambda: ErasureSteps(steps_per_epoch=3), 5, 2),
}


@pytest.fixture(scope="module")
def ckpts(tiny_teacher_ckpt, tmp_path_factory) -> dict[str, Path]:
    """The tiny teacher and a stage-1 student fitted for one step from it (what progressive distillation needs)."""
    root = tmp_path_factory.mktemp("stage1")
    fit(lambda: guidance_distillation({"teacher": tiny_teacher_ckpt}), lambda: DigitsDataModule(batch_size=16), 1, root)
    return {"teacher": tiny_teacher_ckpt, "stage1": root / "checkpoints" / "last.ckpt"}


@pytest.mark.parametrize("method", list(METHODS))
def test_resumed_run_repeats_the_uninterrupted_losses_exactly(method, ckpts, tmp_path):
    make_module, make_data, steps, stop = METHODS[method]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        straight, resumed = straight_and_resumed(lambda: make_module(ckpts), make_data, steps, stop, tmp_path)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert sorted(straight) == list(range(steps))
    assert straight[0] and all(len(row) == len(straight[0]) for row in straight.values())
    assert resumed == straight  # every term, every step, exact float equality


class PlainLoaderDigits(DigitsDataModule):
    """The digits through a plain shuffling DataLoader, as before issue 8 (not resumable mid-epoch)."""

    def train_dataloader(self):
        self.setup()
        return DataLoader(self._sets["train"], batch_size=self.batch_size, shuffle=True, drop_last=True)


def test_without_per_batch_seeds_or_a_resumable_loader_the_losses_differ(ckpts, tmp_path, monkeypatch):
    """The two ingredients are each necessary: the exact comparison above can fail."""
    data = lambda: DigitsDataModule(batch_size=64)  # noqa: E731
    straight, resumed = straight_and_resumed(teacher, data, 4, 2, tmp_path / "reference")
    assert resumed == straight

    straight, resumed = straight_and_resumed(teacher, lambda: PlainLoaderDigits(batch_size=64), 4, 2, tmp_path / "plain")
    assert [resumed[i] for i in (0, 1)] == [straight[i] for i in (0, 1)]
    assert all(resumed[i] != straight[i] for i in (2, 3))  # other batches after the restart

    monkeypatch.setattr(StepSeed, "on_train_batch_start", lambda *args: None)
    straight, resumed = straight_and_resumed(teacher, data, 4, 2, tmp_path / "unseeded")
    assert [resumed[i] for i in (0, 1)] == [straight[i] for i in (0, 1)]
    assert all(resumed[i] != straight[i] for i in (2, 3))  # other noise after the restart


def test_the_seed_is_kept_by_the_checkpoint(ckpts, tmp_path):
    """A resumed run started with another seed_everything seed still continues the interrupted run."""
    data = lambda: DigitsDataModule(batch_size=64)  # noqa: E731
    straight = fit(teacher, data, 3, tmp_path / "straight")
    fit(teacher, data, 2, tmp_path / "part")
    L.seed_everything(123, verbose=False)
    resumed = TrainLosses()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path / "resumed"),
                        callbacks=[resumed])
    trainer.fit(teacher(), data(), ckpt_path=tmp_path / "part" / "checkpoints" / "last.ckpt")
    assert resumed.rows == {2: straight[2]}
