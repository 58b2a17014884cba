"""SIGTERM / SIGINT during `python -m train fit`: the step under way finishes, last.ckpt is written, the process
exits with 128 + the signal number and a one-line message, and the checkpoint resumes to the very weights an
uninterrupted run reaches."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import ROOT, TINY_TEACHER
from train.cli import main


class Heartbeat(L.Callback):
    """Writes the global step to `path` after every training step and slows steps down, so that a test can
    send a signal while training runs."""

    def __init__(self, path: str, pause: float = 0.1):
        super().__init__()
        self.path, self.pause = Path(path), pause

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.path.write_text(str(trainer.global_step))
        time.sleep(self.pause)


def wait_for_step(path: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
    start = time.monotonic()
    while not (path.is_file() and path.read_text() and int(path.read_text()) >= step):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() - start < timeout, "training did not start"
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_a_checkpoint_that_resumes(sig, tmp_path):
    run, beat = tmp_path / "run", tmp_path / "step.txt"
    args = [sys.executable, "-m", "train", "fit", "--config", str(TINY_TEACHER), "--trainer.default_root_dir", str(run),
            "--trainer.max_steps", "1000", "--trainer.limit_val_batches", "0",
            "--trainer.callbacks+=tests.train.test_interrupt.Heartbeat", f"--trainer.callbacks.path={beat}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(beat, proc, 2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    ckpt = run / "checkpoints" / "last.ckpt"
    assert last.startswith(f"{signal.Signals(sig).name}: stopped after step ") and str(ckpt) in last, last
    step = torch.load(ckpt, weights_only=True)["global_step"]
    assert 2 <= step < 1000 and f"step {step} " in last

    common = ["--config", str(TINY_TEACHER), "--trainer.max_steps", str(step + 2), "--trainer.limit_val_batches", "0"]
    resumed = main(["fit", *common, "--trainer.default_root_dir", str(tmp_path / "resumed"), "--ckpt_path", str(ckpt)])
    assert resumed.trainer.global_step == step + 2
    main(["fit", *common, "--trainer.default_root_dir", str(tmp_path / "straight")])
    final = [torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
             for run in ("resumed", "straight")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[1])  # as if never interrupted
