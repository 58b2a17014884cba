"""The shared NaN/inf policy (train.runtime.nonfinite): a NaN injected into a loss term or a gradient is reported with
its step and term, and either skipped (weights, optimizer and EMA untouched) or stops training."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch

import train.methods.erasure as erasure
import train.methods.onestep as onestep
import train.methods.teacher as teacher
from data.digits import DigitsDataModule
from data.steps import ErasureSteps
from tests.conftest import TINY_TEACHER
from train.cli import main
from train.runtime.config import instantiate, read_yaml
from train.runtime.nonfinite import NonFiniteError, NonFiniteGuard, NonFiniteLoss

torch.set_num_threads(1)


def nan_on_calls(monkeypatch, module, name: str, calls: set[int] | None = None) -> None:
    """Make module.name return NaN on the given (0-based) calls, or on every call."""
    real, seen = getattr(module, name), []

    def patched(*args, **kwargs):
        seen.append(None)
        out = real(*args, **kwargs)
        return out * math.nan if calls is None or len(seen) - 1 in calls else out

    monkeypatch.setattr(module, name, patched)


class Weights(L.Callback):
    """The trainable weights before and after each training batch."""

    def __init__(self):
        self.before, self.after = {}, {}

    def _copy(self, pl_module):
        return [p.detach().clone() for p in pl_module.denoiser.net.parameters()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[batch_idx] = self._copy(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[batch_idx] = self._copy(pl_module)


def tiny_teacher(**overrides):
    cfg = read_yaml(TINY_TEACHER)["model"]
    cfg["init_args"].update(overrides)
    return instantiate(cfg)


def fit(module, max_steps: int, *callbacks, batch_size: int = 16) -> L.Trainer:
    torch.manual_seed(0)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=list(callbacks))
    trainer.fit(module, DigitsDataModule(batch_size=batch_size))
    return trainer


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_nan_loss_is_skipped_and_reported_with_its_step(monkeypatch):
    nan_on_calls(monkeypatch, teacher, "denoising_loss", {1})
    module, weights = tiny_teacher(), Weights()
    with pytest.warns(NonFiniteLoss, match=r"^step 1: non-finite loss=nan; skipped this training update$"):
        trainer = fit(module, 3, weights)
    assert [(s["step"], s["phase"], list(s["terms"])) for s in module.nonfinite_guard.skipped] == [(1, "training", ["loss"])]
    assert same(weights.before[1], weights.after[1])  # the skipped update changed nothing
    assert not same(weights.before[0], weights.after[0]) and not same(weights.before[2], weights.after[2])
    adam = next(iter(trainer.optimizers[0].state.values()))
    assert int(adam["step"]) == 2 and int(module.ema.num_updates) == 2  # no optimizer or EMA update for step 1
    assert trainer.global_step == 3  # the step counter (and the LR schedule) moves on
    assert all(torch.isfinite(p).all() for p in module.denoiser.net.parameters())


def test_a_nan_gradient_with_a_finite_loss_is_skipped(monkeypatch):
    module = tiny_teacher()
    first = next(module.denoiser.net.parameters())
    first.register_hook(lambda g: g * math.nan if module.global_step == 0 else g)
    with pytest.warns(NonFiniteLoss, match=r"^step 0: non-finite gradient of loss=nan; skipped"):
        fit(module, 2)
    assert [s["step"] for s in module.nonfinite_guard.skipped] == [0]


def test_stop_policy_ends_training_before_the_bad_update(monkeypatch):
    nan_on_calls(monkeypatch, teacher, "denoising_loss", {1})
    module, weights = tiny_teacher(nonfinite="stop"), Weights()
    with pytest.raises(NonFiniteError, match=r"^step 1: non-finite loss=nan in the training update; training stopped"):
        fit(module, 3, weights)
    assert same(module.denoiser.net.parameters(), weights.after[0])  # step 1's update was not applied
    assert module.nonfinite_guard.skipped == []


def test_too_many_skips_in_a_row_stop_training(monkeypatch):
    nan_on_calls(monkeypatch, teacher, "denoising_loss")
    with pytest.warns(NonFiniteLoss), pytest.raises(NonFiniteError, match="2 training updates in a row"):
        fit(tiny_teacher(max_skips=2), 5)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_erasure_names_the_term(policy, tiny_teacher_ckpt, monkeypatch):
    nan_on_calls(monkeypatch, erasure, "regression_loss", {0})  # the first term of step 0: 'erase'
    module = instantiate({"class_path": "train.methods.erasure.ConceptErasure",
                          "init_args": {"model": str(tiny_teacher_ckpt), "concepts": [3], "batch_size": 4,
                                        "trajectory_steps": 3, "bank_size": 4, "val_samples": 0, "nonfinite": policy}})
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    if policy == "skip":
        with pytest.warns(NonFiniteLoss, match=r"^step 0: non-finite erase=nan; skipped"):
            trainer.fit(module, ErasureSteps(steps_per_epoch=4))
        assert [s["terms"].keys() for s in module.nonfinite_guard.skipped] == [{"erase"}]
    else:
        with pytest.raises(NonFiniteError, match=r"^step 0: non-finite erase=nan in the training update"):
            trainer.fit(module, ErasureSteps(steps_per_epoch=4))


def test_onestep_stop_policy_names_the_generator_term(tiny_teacher_ckpt, monkeypatch):
    nan_on_calls(monkeypatch, onestep, "dmd_loss")
    module = instantiate({"class_path": "train.methods.onestep.OneStepDistillation",
                          "init_args": {"teacher": str(tiny_teacher_ckpt), "fake_score": {"rank": 4},
                                        "nonfinite": "stop"}})
    with pytest.raises(NonFiniteError, match=r"^step 0: non-finite dmd=nan in the generator update"):
        trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(module, DigitsDataModule(batch_size=8))


def test_cli_stop_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    nan_on_calls(monkeypatch, teacher, "denoising_loss")
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(TINY_TEACHER), "--model.init_args.nonfinite", "stop", "--trainer.max_steps", "2",
              "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(tmp_path)])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: step 0: non-finite loss=nan in the training update") and "nonfinite: skip" in err


def test_policy_is_validated():
    with pytest.raises(ValueError, match="nonfinite must be one of skip, stop"):
        NonFiniteGuard("ignore")
    with pytest.raises(ValueError, match="max_skips must be >= 1"):
        NonFiniteGuard("skip", 0)
