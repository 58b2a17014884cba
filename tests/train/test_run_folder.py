"""A run folder is one run's (train.runtime.run_folder, train.fit): a second run is refused unless it resumes or says
so, a live run's lock keeps others out, last.ckpt is always the latest (also after a resume from an interrupted run),
checkpoints are written atomically, and what would train nothing or cannot work is refused in one line."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import lightning as L
import pytest
import torch

from tests.conftest import TINY_TEACHER
from train.cli import main
from train.runtime.interrupt import InterruptCheckpoint
from train.runtime.run_folder import LOCK, AtomicCheckpointIO, RunFolder, RunFolderError


def fit(root, *extra):
    main(["fit", "--config", str(TINY_TEACHER), "--trainer.default_root_dir", str(root), "--trainer.max_steps", "4",
          "--trainer.limit_val_batches", "0", *extra])


def error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


class StopAt(L.Callback):
    """Stops training after step `at` the way SIGTERM does (InterruptCheckpoint writes last.ckpt)."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            next(cb for cb in trainer.callbacks if isinstance(cb, InterruptCheckpoint)).signum = signal.SIGTERM


def test_a_resumed_run_ends_with_last_ckpt_at_its_last_step(tmp_path):
    """Interrupted at step 3, before ModelCheckpoint (every 6 steps) ever wrote last.ckpt, then resumed to step 12:
    last.ckpt holds step 12 and no last-v1.ckpt appears (Lightning versions the name of a file it did not write)."""
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(TINY_TEACHER), "--trainer.default_root_dir", str(run),
              "--trainer.callbacks+=tests.train.test_run_folder.StopAt", "--trainer.callbacks.at=3"])
    assert e.value.code == 128 + signal.SIGTERM
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    main(["fit", "--config", str(TINY_TEACHER), "--trainer.default_root_dir", str(run), "--ckpt_path", str(last)])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(last, weights_only=True)["global_step"] == 12
    assert not (run / LOCK).exists()


def test_last_ckpt_holds_the_final_step_when_the_checkpoint_interval_does_not_divide_max_steps(tmp_path):
    """ModelCheckpoint every 6 steps, max_steps 8: last.ckpt is step 8, not the step-6 one (the demo's 600-step
    teacher checkpointing every 500 ended with a last.ckpt of step 500)."""
    run = tmp_path / "run"
    fit(run, "--trainer.max_steps", "8")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]


def test_a_second_run_into_a_run_folder_is_refused_unless_resumed_or_asked(tmp_path, capsys):
    run = tmp_path / "run"
    fit(run)
    config, last = (run / "config.yaml").read_text(), (run / "checkpoints" / "last.ckpt").read_bytes()
    err = error(capsys, "fit", "--config", str(TINY_TEACHER), "--trainer.default_root_dir", str(run),
                "--trainer.max_steps", "2")
    assert "already holds a run" in err and "--ckpt_path" in err and "--reuse_run_folder" in err
    assert (run / "config.yaml").read_text() == config and (run / "checkpoints" / "last.ckpt").read_bytes() == last
    fit(run, "--ckpt_path", "last", "--trainer.max_steps", "6")  # `last`: this folder's last.ckpt, checked first
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    fit(run, "--reuse_run_folder", "true", "--trainer.max_steps", "2")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    err = error(capsys, "fit", "--config", str(TINY_TEACHER), "--trainer.default_root_dir", str(tmp_path / "new"),
                "--ckpt_path", "last")
    assert "has no checkpoints/last.ckpt" in err


def test_a_live_run_holds_its_folder_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK).write_text(str(other.pid))
        err = error(capsys, "fit", "--config", str(TINY_TEACHER), "--trainer.default_root_dir", str(run))
        assert f"another run (process {other.pid}) is writing to" in err
    finally:
        other.kill()
        other.wait()
    fit(run)  # the lock of a process that no longer runs does not stop the next run
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / LOCK).exists()


def test_a_failed_start_leaves_no_folder_and_a_file_is_not_a_folder(tmp_path, capsys):
    err = error(capsys, "fit", "--config", str(TINY_TEACHER), "--trainer.default_root_dir", str(tmp_path / "run"),
                "--model.init_args.p_uncond", "2.0")
    assert "p_uncond" in err and not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("x")
    for root in (tmp_path / "file", tmp_path / "file" / "sub"):
        err = error(capsys, "fit", "--config", str(TINY_TEACHER), "--trainer.default_root_dir", str(root))
        assert "default_root_dir" in err


def test_checkpoints_are_written_atomically_beside_the_target(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}

    def broken(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}  # the previous checkpoint, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left behind

    stale, live = tmp_path / ".step=4.ckpt.tmp-999999999", tmp_path / f".step=5.ckpt.tmp-{os.getpid()}"
    stale.write_text("x"), live.write_text("x")
    (tmp_path / "checkpoints").mkdir()
    os.replace(stale, tmp_path / "checkpoints" / stale.name), os.replace(live, tmp_path / "checkpoints" / live.name)
    folder = RunFolder(tmp_path, reuse=True)
    folder.claim()
    folder.release()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [live.name]  # a dead writer's temporary goes


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_max_steps_that_train_nothing_are_refused(tmp_path, capsys, steps):
    err = error(capsys, "fit", "--config", str(TINY_TEACHER), "--trainer.default_root_dir", str(tmp_path / "r"),
                "--trainer.max_steps", steps)
    assert "trains nothing" in err and not (tmp_path / "r").exists()


def test_fit_without_a_config_and_a_learning_rate_monitor_without_a_logger_say_what_to_do(tmp_path, capsys):
    assert "pass --config" in error(capsys, "fit")
    assert "pass --config" in error(capsys, "fit", "--trainer.max_steps", "3")
    err = error(capsys, "fit", "--config", str(TINY_TEACHER), "--trainer.default_root_dir", str(tmp_path / "r"),
                "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor")
    assert "LearningRateMonitor needs a logger" in err


def test_the_help_lists_every_command_with_an_example_and_answers_fast():
    import time

    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "train", "--help"], capture_output=True, text=True, check=True).stdout
    took = time.monotonic() - start
    for command in ("fit", "validate", "sample", "evaluate", "export", "guiders", "demo", "digits-pipeline"):
        assert f"\n    {command}" in out, command
    assert "examples:" in out and "python -m train sample --ckpt" in out
    mods = subprocess.run([sys.executable, "-c", "import sys, train.cli; print('lightning' in sys.modules, "
                           "'torch' in sys.modules)"], capture_output=True, text=True, check=True).stdout.split()
    assert mods == ["False", "False"], "the CLI imports nothing heavy before a command runs"
    assert took < 30  # generous: the point is the import check above (seconds, not the 10-20 s of Lightning's)


def test_the_progress_bar_counts_steps_of_max_steps(tmp_path):
    from train.runtime.progress import StepProgressBar

    class Seen(L.Callback):
        def on_train_end(self, trainer, pl_module):
            bar = trainer.progress_bar_callback.train_progress_bar
            self.total, self.n = bar.total, bar.n

    from train.runtime.config import instantiate, read_yaml
    from data.digits import DigitsDataModule

    seen = Seen()
    trainer = L.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        callbacks=[StepProgressBar(), seen], enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(instantiate(read_yaml(TINY_TEACHER)["model"]), DigitsDataModule(batch_size=32))  # 47 batches an epoch
    assert (seen.total, seen.n) == (60, 60)  # one bar over two epochs, in optimizer steps


@pytest.mark.parametrize("chosen", [None, "lightning.pytorch.callbacks.RichProgressBar"])
def test_fit_shows_the_step_bar_whether_or_not_rich_is_installed_and_keeps_a_chosen_bar(tmp_path, monkeypatch, chosen):
    """Lightning's default bar is its Rich bar when `rich` is installed (typer brings it in): `fit` replaces that
    default by the step bar, as it does the tqdm one, and keeps a bar the config names."""
    from lightning.pytorch.callbacks import RichProgressBar

    from train.runtime.progress import StepProgressBar

    seen = []
    for cls in (StepProgressBar, RichProgressBar):
        monkeypatch.setattr(cls, "on_train_end", lambda self, trainer, pl_module: seen.append(
            type(trainer.progress_bar_callback)), raising=False)
    fit(tmp_path / "run", "--trainer.enable_progress_bar", "true", *([f"--trainer.callbacks+={chosen}"] if chosen else []))
    assert seen == [RichProgressBar if chosen else StepProgressBar]
